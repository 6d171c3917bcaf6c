"""Performance tooling: measure, estimate and check the pretraining step (not needed to train).

- `bench`: times the step (samples/s, achieved TFLOP/s, peak memory), eager or the fast path.
- `memory`: estimates a bf16 step's peak GPU memory on any machine, with fake tensors.
- `numerics`: trains eager and the fast path from one seed and compares the loss curves.
- `profiling`: torch.profiler over a few steps, summarised by phase and op.
- `cli`: the `brainjepa bench | memory | numerics` commands (`register(app)`).

The fast path itself (`brainjepa.fastpath`, `brainjepa.prefetch`, `PerfConfig`) is training runtime
and lives outside this package. Importing this package imports none of its modules. The one-off
measurements built on it (the GPU plan, the memory estimate run on the reference code) are in `scripts/`.
"""
