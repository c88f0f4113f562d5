#!/usr/bin/env bash
# One call on a GPU machine: GPU tests + latency benchmark; results under $OUT. Usage: bash benchmarks/gpu_check.sh [stage...]
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stages=${*:-"env tests probe"}
for s in $stages; do
  case $s in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
         python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)" | tee -a "$OUT/env.txt";;
    host) { for f in /proc/sys/kernel/numa_balancing /sys/kernel/mm/transparent_hugepage/enabled \
               /sys/kernel/mm/transparent_hugepage/defrag /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor; do
               echo "$f: $(cat $f 2>&1)"; done
           echo "numa nodes: $(ls -d /sys/devices/system/node/node* 2>&1 | xargs -n1 basename | tr '\n' ' ')"
           echo "gpu numa node: $(cat /sys/bus/pci/devices/$(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader | \
               tr 'A-Z' 'a-z' | sed 's/^0000\(....\)/\1/')/numa_node 2>&1)"
           echo "allowed cpus: $(grep Cpus_allowed_list /proc/self/status)"; nproc; which numactl taskset
           lscpu | grep -i "model name\|numa\|socket\|thread"; } 2>&1 | tee "$OUT/host.txt";;
    # the GPU tests of the decode step's own kernels (fused norm GEMVs, PDL chain, slots with block-table updates,
    # sampling with advance) and of the engine's graphs: a few minutes, where `ktests` + `tests` take longer than a call
    quick) timeout 280 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_gemv.py \
             tests/kernels/test_pdl.py tests/kernels/test_kv_store.py tests/kernels/test_sampling.py \
             tests/test_graphs_gpu.py 2>&1 | tail -6 | tee "$OUT/gpu_quick_tests.txt"
           timeout 150 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_attention.py \
             tests/kernels/test_gemm.py -k "decode or small_prefill" 2>&1 | tail -3 | tee -a "$OUT/gpu_quick_tests.txt"
           # the prefix-cache attention (page ids read ahead, balanced splits), the float32 projection outputs and the
           # peer all-reduce (two ranks on one card; the communicator's methods in a one-rank group)
           timeout 200 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_cached_prefill_attention.py \
             tests/kernels/test_wide_outputs.py tests/kernels/test_peer_all_reduce.py 2>&1 | tail -3 \
             | tee -a "$OUT/gpu_quick_tests.txt";;
    ktests) timeout 250 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels 2>&1 | tail -15 | tee "$OUT/gpu_kernel_tests.txt";;
    tests) timeout 300 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests --ignore=tests/test_tensor_parallel_gpu.py 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt";;
    # tensor parallelism (kind nvidia-h200-x2): all-reduce methods by size, the TP GPU test (own process: it kills a
    # worker), then TP=1 vs TP=2 of the 7B shape (tpsmall) and the 70B shape at TP=2 (tpbig)
    allreduce) timeout 200 python3 benchmarks/allreduce_bench.py --gpus ${TP:-2} --out "$OUT/allreduce.json" ${AR_ARGS:-} 2>&1 | tail -14;;
    tptests) timeout 400 python3 -m pytest -q -x -p no:cacheprovider tests/test_tensor_parallel_gpu.py 2>&1 | tail -15 | tee "$OUT/tp_tests.txt";;
    # the peer all-reduce against NCCL: per message size, then the 7B shape's TP=2 engine with each (one TP=1 run)
    tppeer) AR_ARGS="--methods nccl,peer,peer_f32,one_shot_bf16 --sizes 8192,16384,65536,262144,1048576,2097152" \
              timeout 170 bash "$0" allreduce
            TP_ARGS="--runs 10 --variants allreduce=peer,allreduce=nccl,allreduce=peer+tp_sum=float32" timeout 400 \
              bash "$0" tpsmall;;
    tpsmall) timeout 570 python3 benchmarks/tp_bench.py --tp ${TP:-2} --big "" --out-dir "$OUT" ${TP_ARGS:-} 2>&1 | grep -v "Warn\|INFO" | tail -12;;
    # a file too large to carry in one call, in parts (e.g. split -b 47M x.gguf .gguf/part_): `ggstash` keeps the
    # carried parts in /tmp/gg (a warm machine keeps /tmp between calls; carry replaces the folder), `ggjoin` joins
    # /tmp/gg's parts into $GGUF
    ggstash) mkdir -p /tmp/gg && cp .gguf/part_* /tmp/gg/ && ls /tmp/gg;;
    ggjoin) cat /tmp/gg/part_* > "${GGUF:?set GGUF=/tmp/model.gguf}" && sha256sum "$GGUF";;
    # TP agreement on learned weights: SmolLM2-135M-Instruct's GGUF with attention cut to 6 query / 2 KV heads
    tpreal) timeout 120 python3 benchmarks/pruned_checkpoint.py --gguf "${GGUF:?set GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf}" \
              --out /tmp/smollm2-135m-6-heads 2>&1 | tail -1
            timeout 450 python3 benchmarks/tp_bench.py --tp ${TP:-2} --model /tmp/smollm2-135m-6-heads --big "" --runs 5 \
              --out-dir "$OUT" ${TP_ARGS:-} 2>&1 | grep -v "Warn\|INFO" | tail -12;;
    tpbig) timeout 570 python3 benchmarks/tp_bench.py --tp ${TP:-2} --skip-small --out-dir "$OUT" ${TP_ARGS:-} 2>&1 | grep -v "Warn\|INFO" | tail -12;;
    probe) timeout 250 python3 benchmarks/probe.py --out "$OUT/probe.json" 2>&1 | tail -60;;
    cold) TRITON_CACHE_DIR=$(mktemp -d) timeout 280 python3 benchmarks/cold_start.py --out "$OUT/cold_start_empty_cache.json" 2>&1 | tail -3
          timeout 280 python3 benchmarks/cold_start.py --out "$OUT/cold_start_warm_cache.json" 2>&1 | tail -3;;
    gemm) timeout 240 python3 benchmarks/gemm_bench.py --cublas-variants --ms ${GEMM_MS:-16,32,48,64,80,96,112,128,144,160,176,192,200,208,224,240,256,288,320,384,448,512} \
            --json "$OUT/gemm_variants.json" 2>&1 | grep -v "^shape=" | tail -30;;
    # the prefill projection plan on this card (kernels/sweeps/prefill_gemm_sweep.py): every choice per bucket M
    pgemm) timeout $(( ${PGEMM_BUDGET_S:-300} + 60 )) python3 benchmarks/prefill_gemm_bench.py --budget-s ${PGEMM_BUDGET_S:-300} \
             ${PGEMM_ARGS:-} --json "$OUT/prefill_gemm.json" 2>&1 | grep -v "^  M=" | tail -40;;
    peer) timeout 150 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/kernels/test_peer_all_reduce.py \
            tests/kernels/test_cached_prefill_attention.py 2>&1 | tail -3 | tee "$OUT/gpu_peer_tests.txt";;
    gemmsweep) timeout 300 python3 benchmarks/gemm_bench.py --json "$OUT/gemm_bench.json" 2>&1 | tail -70;;
    attn) timeout 150 python3 benchmarks/prefill_attn_sweep.py --lengths ${ATTN_T:-16,32,64,128,160,208,256,384,512} --json "$OUT/prefill_attn.json" 2>&1 | tail -22;;
    cattn) timeout 240 python3 benchmarks/cached_attn_sweep.py --json "$OUT/cached_attn.json" 2>&1 | tail -40;;
    ttft) timeout 150 python3 benchmarks/ttft_breakdown.py --out "$OUT" 2>&1 | grep -v Warn | tail -8;;
    # an agent turn (prefix-caching issue): 84 new tokens after 0 / 1,952 cached, host phases and a host profile
    aturn) timeout 200 python3 benchmarks/ttft_breakdown.py --lengths 50,84 --cached-starts 0,1952 --runs 20 --no-trace \
             --host-profile --out "$OUT" 2>&1 | grep "new after";;
    jithost) timeout 200 python3 benchmarks/jit_host_profile.py --out "$OUT/jithost" 2>&1 | grep -v Warn | tail -${JITHOST_TAIL:-32};;  # A/B inside
    launch) timeout 120 python3 benchmarks/launch_overhead.py --json "$OUT/launch_overhead.json" 2>&1 | tail -20;;
    coldwarm) for i in $(seq ${COLD_RUNS:-1}); do  # several runs: the first request is host-bound, and hosts differ
                timeout 280 python3 benchmarks/cold_start.py --out "$OUT/cold_start_warm_cache_$i.json" 2>&1 | tail -1; done;;
    kbench) timeout 300 python3 benchmarks/kernel_bench.py --out "$OUT/kernel_bench.json" 2>&1 | tail -40;;
    bench) timeout 560 python3 -m hybrid_engine.bench --model llama-2-7b-shape --out-dir "$OUT" --system-timeout 170 2>&1 | tail -60;;
    hbench) timeout 300 python3 -m hybrid_engine.bench --model llama-2-7b-shape --systems hybrid --runs ${HBENCH_RUNS:-100} \
            --out-dir "$OUT/hybrid-runs${HBENCH_RUNS:-100}" 2>&1 | grep "^| hybrid\|^| system\|wrote";;  # the engine alone: p99 of 100 runs
    tail) timeout 200 python3 benchmarks/ttft_tail.py --lengths ${TAIL_LENGTHS:-50,200} --runs ${TAIL_RUNS:-200} --out "$OUT/ttft_tail.json" 2>&1 | grep -v "Warn\|INFO";;
    ptail) timeout 120 python3 benchmarks/cpu_probe.py --cpus ${PROBE_CPUS:-0,5,10,15} --seconds ${PROBE_S:-75} --out "$OUT/cpu_probe.json" &
           sleep 2; timeout 200 python3 benchmarks/ttft_tail.py --lengths ${TAIL_LENGTHS:-50,200} --runs ${TAIL_RUNS:-200} \
             --out "$OUT/ttft_tail.json" 2>&1 | grep -v "Warn\|INFO\|slow:"; wait;;
    hostpath) timeout 150 python3 benchmarks/host_path.py --length ${HP_LEN:-50} 2>&1 | grep -v "Warn\|INFO" | tee "$OUT/host_path.txt";;
    bprof) timeout 150 python3 benchmarks/bucket_profile.py --length ${BPROF_LEN:-200} ${BPROF_ARGS:-} --json "$OUT/bucket_profile.json" 2>&1 | grep -v "Warn\|INFO" | tail -32;;
    gusilu) timeout 150 python3 benchmarks/gemv_bench.py --gate-up-silu --json "$OUT/gate_up_silu.json" 2>&1 | tail -16;;
    qkvrope) timeout 150 python3 benchmarks/gemv_bench.py --qkv-rope --json "$OUT/qkv_rope.json" 2>&1 | tail -16;;
    decodegemm) timeout 300 python3 benchmarks/decode_gemm_bench.py --json "$OUT/decode_gemm.json" 2>&1 | tail -40;;
    gguf) timeout 300 python3 benchmarks/gguf_agreement.py --gguf "${GGUF:?set GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf}" \
            --out "$OUT/gguf" 2>&1 | grep -v "Warn\|INFO\|Convert\|Loading" | tail -3
          timeout 560 python3 -m hybrid_engine.bench --model "$GGUF" --systems hybrid,transformers_eager \
            --out-dir "$OUT/gguf-bench" --system-timeout ${GGUF_SYS_T:-250} ${GGUF_BENCH_ARGS:-} 2>&1 | grep -v "Convert\|Loading" | tail -30;;  # needs gguf
    pbench) timeout 300 python3 -m pytest benchmarks -m gpu -q -p no:cacheprovider --benchmark-json="$OUT/bench-gpu.json" 2>&1 | tail -30
          python3 ci/gate.py "$OUT/bench-gpu.json" --tolerance 0.10 --min-delta-ms 0.2 | tee "$OUT/gate.txt";;  # this card's baseline
    gate) # This card's TTFT baseline and the proof that the gate bites: the TTFT suite three times, real (-> $OUT/gpu-<card>.json,
          # commit it as ci/baselines/gpu-<card>.json), real again (gate must PASS), slowed by $SLOW_S s per request (must FAIL).
          # CPU dry run: GATE_MARK="not gpu" GATE_K="test_ttft and (L50 or L200)" GATE_ARGS="--bench-rounds 8" SLOW_S=0.3 GATE_OPTS="--tolerance 0.5 --min-delta-ms 100"
          card=$(python3 -c "import torch; from hybrid_engine.bench.hardware import card_name as c; print(c(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))")
          base="$OUT/$(basename "$(python3 ci/gate.py --which --card "$card")")"
          suite=(python3 -m pytest benchmarks -m "${GATE_MARK:-gpu}" -k "${GATE_K:-test_ttft}" -q -p no:cacheprovider ${GATE_ARGS:-})
          timeout 280 "${suite[@]}" --benchmark-json="$base" 2>&1 | tail -2
          timeout 280 "${suite[@]}" --benchmark-json="$OUT/gate-current-real.json" 2>&1 | tail -2
          HYBRID_ENGINE_SLOW_S=${SLOW_S:-0.002} PYTHONPATH=ci:$PYTHONPATH timeout 280 "${suite[@]}" -p slow_engine \
            --benchmark-json="$OUT/gate-current-slowed.json" 2>&1 | tail -2
          for run in real slowed; do
            python3 ci/gate.py "$base" "$OUT/gate-current-$run.json" ${GATE_OPTS:---tolerance 0.10 --min-delta-ms 0.2} > "$OUT/gate-$run.txt"
            rc=$?; want=$([ $run = real ] && echo 0 || echo 1)
            echo "gate, $run engine: exit $rc (want $want)" >> "$OUT/gate-$run.txt"; cat "$OUT/gate-$run.txt"
          done
          echo "baseline for '$card': $base -> commit as ci/baselines/$(basename "$base")";;
    batch) timeout ${BATCH_T:-300} python3 benchmarks/batch_bench.py --out "$OUT/batch_bench.json" 2>&1 | grep -v "Warn\|INFO" | tail -8;;
    prefix) timeout ${PREFIX_T:-300} python3 benchmarks/prefix_bench.py --out "$OUT/prefix_bench.json" ${PREFIX_ARGS:-} 2>&1 \
              | grep -v "Warn\|INFO" | tail -8;;  # PREFIX_ARGS="--agreement-model $GGUF": (d) on real weights too
    # one conversation's turns: TTFT and host time before each prefill, with a host profile of that time (~70 s)
    turnhost) PREFIX_ARGS="--parts a,b --runs 20 --conversations 0 --host-profile $OUT/turn_host_profile.txt" \
                bash "$0" prefix;;
    structured) timeout ${STRUCT_T:-400} python3 benchmarks/structured_bench.py --out "$OUT/structured_bench.json" 2>&1 | grep -v "Warn\|INFO" | tail -8;;
    serve) timeout ${SERVE_T:-400} python3 benchmarks/serve_load.py --model llama-2-7b-shape --clients ${CLIENTS:-32} \
             --out "$OUT/serve_load.json" 2>&1 | tail -2;;
    # the any-card shapes (issue: per-device tuning): one results file per preset (kernels per decode step and GPU idle
    # time included), then load_to_ready_s of one preset in fresh processes, empty and warm Triton cache
    shapes) for m in ${SHAPES:-llama-2-7b-shape llama-3-8b-shape qwen2-7b-shape llama-3.2-1b-shape smollm2-135m-shape}; do
              timeout ${SHAPE_T:-200} python3 -m hybrid_engine.bench --model $m --systems hybrid --runs ${SHAPE_RUNS:-20} \
                --tpot-runs 10 --out-dir "$OUT/shapes" --system-timeout $(( ${SHAPE_T:-200} - 10 )) --settle-s 60 \
                --no-progress 2>&1 | grep "^| hybrid\|wrote\|rror"; done
            tar czf "$OUT/shapes.tgz" -C "$OUT" shapes && rm -r "$OUT/shapes";;  # a call returns at most 8 files
    # load_to_ready_s: the preset, then a checkpoint directory of its shape written first (shape_checkpoint.py), each
    # with compiled bytecode (--pycache); with .ab/ present (a base commit's package, as for ab) the base first, then
    # this tree; LTR_EVICT=1 adds this tree's checkpoint load read from the disk (dropped from the page cache)
    ltr) m=${LTR_MODEL:-llama-2-7b-shape}; ck=/tmp/$m-checkpoint
         [ -d $ck ] || python3 benchmarks/shape_checkpoint.py --model $m --out $ck 2>&1 | tail -1
         runs="$([ -d .ab ] && echo "$m,.ab,base $ck,.ab,base-checkpoint") $m,.,tree $ck,.,tree-checkpoint"
         [ "${LTR_EVICT:-0}" = 1 ] && runs="$runs $ck,.,tree-checkpoint-evicted"
         for r in $runs; do IFS=, read src pkg name <<< "$r"; extra=""; [[ $name == *evicted ]] && extra=--evict-page-cache
           timeout 280 python3 benchmarks/load_to_ready.py --model $src --package $pkg --pycache $extra ${LTR_ARGS:-} \
             --out "$OUT/load_to_ready_$name.json" 2>&1 | grep -v Warn | tail -3 | sed "s/^/$name /"; done;;
    # same-lease A/B of batch-1 latency over environment knobs (e.g. HYBRID_ENGINE_PDL=0 vs 2), a fresh process each
    knobs) mkdir -p "$OUT/knobs"; for m in ${KNOB_MODELS:-llama-2-7b-shape llama-3.2-1b-shape smollm2-135m-shape}; do
             for kv in ${KNOBS:-HYBRID_ENGINE_PDL=0 HYBRID_ENGINE_PDL=2}; do env $kv timeout ${KNOB_T:-150} python3 \
               benchmarks/batch_bench.py --model $m --parts ${KNOB_PARTS:-batch1} --runs ${KNOB_RUNS:-20} \
               --out "$OUT/knobs/${m}_${kv//=/-}.json" 2>&1 | grep -v "Warn\|INFO" | tail -2 | sed "s/^/$m $kv /"; done; done
           tar czf "$OUT/knobs.tgz" -C "$OUT" knobs && rm -r "$OUT/knobs";;
    # same-lease A/B of batch-1 latency: the package in .ab/ (a base commit: mkdir -p .ab && git archive <commit>
    # hybrid_engine | tar -x -C .ab; carry ".ab") vs this tree, with AB_NEW_ARGS for this tree's engine only
    # (e.g. "--batch-invariant off": the one-row GEMVs against the base)
    ab) for i in $(seq ${AB_ROUNDS:-2}); do
          PYTHONPATH=.ab timeout ${AB_T:-150} python3 benchmarks/batch_bench.py --batch1-only --runs ${AB_RUNS:-40} --out "$OUT/ab_base_$i.json" 2>&1 | tail -1
          timeout ${AB_T:-150} python3 benchmarks/batch_bench.py --batch1-only --runs ${AB_RUNS:-40} ${AB_NEW_ARGS:-} \
            --out "$OUT/ab_new_$i.json" 2>&1 | tail -1; done;;
  esac
done
