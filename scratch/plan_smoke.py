"""Greedy tokens with the card's prefill plan (graphs, capture eager) vs capture off, per preset; and which plan
choices the prefill buckets of each projection take."""
import sys
import time

import torch

from hybrid_engine import LLM, SamplingParams
from hybrid_engine.kernels import gemm

LENGTHS = (10, 16, 40, 64, 100, 250)
sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
for model in sys.argv[1:]:
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(5, 30000, (n,), generator=gen).tolist()} for n in LENGTHS]
    outs = {}
    for capture in ("eager", "off"):
        t0 = time.time()
        llm = LLM(model, capture=capture, enable_prefix_caching=False)
        outs[capture] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp)]
        outs[capture] += [list(llm.generate(p, sp)[0].outputs[0].token_ids) for p in prompts]  # one at a time
        st = llm.stats()
        print(model, capture, f"{time.time() - t0:.0f} s", "graph_steps", st.get("graph_steps"), "jit", st.get("jit_steps"),
              flush=True)
        llm.close()
        del llm
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(outs["eager"], outs["off"]))
    print(model, f"identical {same}/{len(outs['off'])}", flush=True)
