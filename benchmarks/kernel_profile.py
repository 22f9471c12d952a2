"""GPU kernel times of a jitted call, by kernel name (CUPTI through torch.profiler, which sees
XLA's kernels): shared by the decode benchmarks. Needs torch with CUDA on the machine."""


def profile_kernels(fn, per_call: int, top: int, calls: int = 2) -> dict:
  """Runs fn() `calls` times under the profiler; times are per unit (per_call units a call,
  e.g. tokens) -> {'kernels_per_token', 'kernel_ms_per_token', 'top': [(ms, count, name)]}."""
  import jax  # pylint: disable=import-outside-toplevel
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      jax.block_until_ready(fn())
  rows = []
  for e in prof.key_averages():
    dev = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
    if dev:
      rows.append((dev / 1e3 / calls / per_call, e.count / calls / per_call, e.key[:90]))
  rows.sort(reverse=True)
  for ms, n, name in rows[:top]:
    print(f"  {1e3 * ms:8.2f} us/token  x{n:6.2f}  {name}", flush=True)
  return {"kernels_per_token": sum(r[1] for r in rows),
          "kernel_ms_per_token": sum(r[0] for r in rows), "top": rows[:top]}
