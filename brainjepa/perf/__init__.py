"""Performance tooling: measure, estimate and check the pretraining step (not needed to train).

- `bench`: times the step (samples/s, achieved TFLOP/s, peak memory), eager or the fast path.
- `memory`: estimates a bf16 step's peak GPU memory on any machine, with fake tensors.
- `numerics`: trains eager and the fast path from one seed and compares the loss curves.
- `profiling`: torch.profiler over a few steps, summarised by phase and op.
- `cli`: the `brainjepa bench | memory | numerics` commands (`register(app)`).
- `gpu_plan`: the GPU measurements in one device call (`python3 -m brainjepa.perf.gpu_plan`).
- `reference_memory`: the memory estimate run on the reference code, against its measured peaks.

The fast path itself (`brainjepa.fastpath`, `brainjepa.prefetch`, `PerfConfig`) is training runtime
and lives outside this package. Importing this package imports none of its modules.
"""
