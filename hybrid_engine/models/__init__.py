"""Engine-native model implementations, their registry and loaders."""
