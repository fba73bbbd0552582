"""Per-device memory and FLOPs of a method's train step: backbone x dtype x remat x sharding x
per-device batch, from XLA's memory and cost analysis of the compiled step.

  python benchmarks/memory.py [--method=simclr] [--models=resnet50,vit_small]
      [--batches=32,64] [--dtypes=float32,bfloat16] [--remat=off,on] [--fsdp=1]
      [--devices=8] [--image_size=224] [--fit_gib=16,32] [--verify] [--run]

Each row builds the step exactly as the trainer does (`experiment.build` on
configs/<method>.py:backbone=<model>,dataset=tfds:imagenet2012, so the paper's recipe for that
backbone at 224 pixels, with host-cropped uint8 views as ImageNet feeds them) on `--devices`
simulated CPU devices, lowers it on abstract inputs (nothing is allocated) and compiles it.
XLA's memory analysis is of the partitioned program, so every figure is per device:

* args: the inputs (train state, or its slice with fsdp, and this device's images);
* temp: XLA's temporary buffers (activations kept for the backward pass, gradients,
  optimizer temporaries), after its buffer sharing;
* out: outputs that do not reuse a donated input (the step donates its state);
* peak = args + temp + out: every buffer the step owns at once, at worst. What a device must
  hold beside the runtime's own reserve and fragmentation, which this does not count;
* GFLOP: XLA's cost analysis of the per-device program, recomputation included;
* resid: bytes the forward pass hands to the backward pass (the leaves of `jax.vjp`'s
  backward function of one device's loss; no XLA involved): what the remat policy decides.
  Parameters and inputs, which are held anyway, are not counted.

The second table gives, for each model x dtype x remat x sharding, the largest per-device batch
whose peak fits in each of `--fit_gib` GiB. Memory is affine in the batch (state is fixed,
activations grow with it): the line through the peaks at the two smallest `--batches` is
extrapolated; `--verify` compiles at each predicted batch and reports its actual peak.

XLA:CPU is a stand-in for the accelerator's compiler here, and it undoes rematerialisation by
default (see `ssl_jax.models.remat.CPU_COMPILER_OPTIONS`): every step is compiled with those
options so that remat's saving shows, unless `--no-cpu_remat_options`. Its buffer assignment is
still not a TPU's or a GPU's (other fusion, layouts without tile padding, no scheduling for
overlap), so take the absolute figures as estimates; the comparisons between rows are the point.
bfloat16 rows overstate most: XLA:CPU computes bfloat16 convolutions in float32, keeping both
copies (ResNet-50's bfloat16 step takes more temporary memory than its float32 one); the resid
column, taken before XLA, shows what bfloat16 saves on activations.

`--run` also executes each step once on random images and reports the measured growth of the
process's resident memory during the step, divided by the device count (the simulated devices
share the process); slow at 224 pixels on a CPU. `--fsdp=8` needs the 2-D mesh
(`parallel.make_mesh(fsdp=...)`, `config.mesh.fsdp`). Measured tables: benchmarks/memory_results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import sys
import threading
import time

DEVICES_FLAG = '--xla_force_host_platform_device_count'


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  csv = lambda s: [x for x in s.split(',') if x]  # noqa: E731
  ints = lambda s: [int(x) for x in csv(s)]  # noqa: E731
  p.add_argument('--method', default='simclr', help='configs/<method>.py')
  p.add_argument('--models', type=csv, default=['resnet50', 'vit_small'],
                 help='backbones: resnet50, vit_small (ViT-S/16), vit_base (ViT-B/16), ...')
  p.add_argument('--batches', type=ints, default=[32, 64], help='per-device batch sizes')
  p.add_argument('--dtypes', type=csv, default=['float32', 'bfloat16'])
  p.add_argument('--remat', type=csv, default=['off', 'on'],
                 help="'off', 'on' (the default policy) or policy names (models/remat.py)")
  p.add_argument('--fsdp', type=ints, default=[1], help='fsdp axis sizes (1: replicated)')
  p.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--fit_gib', type=ints, default=[16, 32])
  p.add_argument('--verify', action='store_true',
                 help='compile at each predicted largest batch and report its peak')
  p.add_argument('--run', action='store_true',
                 help='also run each step once and measure resident memory (slow)')
  p.add_argument('--cpu_remat_options', action=argparse.BooleanOptionalAction, default=True,
                 help='compile with models.remat.CPU_COMPILER_OPTIONS')
  return p.parse_args(argv)


# Before jax is imported: the simulated devices are fixed when its CPU backend starts.
if __name__ == '__main__':
  _ARGS = parse_args()
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' {DEVICES_FLAG}={_ARGS.devices}').strip()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Case:
  model: str
  dtype: str
  remat: str      # 'off' or a policy name
  fsdp: int
  batch: int      # per device

  @property
  def group(self):
    return (self.model, self.dtype, self.remat, self.fsdp)


@dataclasses.dataclass
class Row:
  case: Case
  args: int
  temp: int
  out: int
  gflop: float
  residuals: int
  compile_s: float
  rss: int | None = None

  @property
  def peak(self) -> int:
    return self.args + self.temp + self.out


def remat_policy(remat: str) -> str | None:
  """None for 'off'; the policy name ('' = default) otherwise."""
  from ssl_jax.models import remat as remat_lib
  if remat == 'off':
    return None
  if remat == 'on':
    return ''
  if remat not in remat_lib.POLICIES:
    raise SystemExit(f'--remat: {remat!r} is neither off, on nor a policy '
                     f'{sorted(remat_lib.POLICIES)}.')
  return remat


def make_mesh(fsdp: int):
  from ssl_jax import parallel
  if fsdp == 1:
    return parallel.make_mesh()
  if 'fsdp' not in inspect.signature(parallel.make_mesh).parameters:
    raise SystemExit(f'--fsdp={fsdp} needs the 2-D mesh, parallel.make_mesh(fsdp=N) and '
                     'config.mesh.fsdp, which this checkout does not have yet; use --fsdp=1.')
  return parallel.make_mesh(fsdp=fsdp)


def make_config(method: str, case: Case, devices: int, image_size: int):
  import importlib
  config = importlib.import_module(f'ssl_jax.configs.{method}').get_config(
      f'backbone={case.model},dataset=tfds:imagenet2012,batch={case.batch * devices},'
      f'crop={image_size}')
  config.model.dtype = case.dtype
  policy = remat_policy(case.remat)
  config.model.remat = policy is not None
  config.model.remat_policy = policy or ''
  if case.fsdp > 1:
    if 'mesh' not in config or 'fsdp' not in config.mesh:
      raise SystemExit(f'--fsdp={case.fsdp} needs config.mesh.fsdp, not in this checkout yet.')
    config.mesh.fsdp = case.fsdp
  config.eval.online_probe = False  # a probe's labels would need the data set's classes
  return config


def abstract_views(built, rows_per_device: int):
  """This step's images as ImageNet's trainer feeds them: one uint8 array per view, cropped
  on the host (`data.host_crop`), abstract and sharded over the batch."""
  from ssl_jax import parallel
  from ssl_jax.data import augment, host_crop
  specs = host_crop.crop_specs(augment.view_configs(built.config.augment,
                                                    built.method.num_views))
  rows = rows_per_device * built.mesh.devices.size
  sharding = parallel.batch_sharded(built.mesh)
  return tuple(jax.ShapeDtypeStruct((rows, s.size, s.size, 3), np.uint8, sharding=sharding)
               for s in specs)


def residual_bytes(built, rows_per_device: int) -> int:
  """Bytes of what one device's forward pass keeps for its backward pass (jax's view): the
  leaves of `jax.vjp`'s backward function, less those that are the parameters themselves or
  constants (held anyway)."""
  state = jax.eval_shape(built.init_fn, jax.random.PRNGKey(0))
  views = [jax.ShapeDtypeStruct((rows_per_device, v.shape[1], v.shape[2], 3), np.float32)
           for v in abstract_views(built, rows_per_device)]

  def backward_function(params, state, views):
    def loss(params):
      return built.method.loss(params, state.batch_stats, state.target_params,
                               state.method_state, views, jax.random.PRNGKey(0),
                               jax.numpy.zeros((), jax.numpy.int32), None)[0]
    return jax.vjp(loss, params)[1]

  jaxpr = jax.make_jaxpr(backward_function)(state.params, state, views).jaxpr
  held = {id(v) for v in (*jaxpr.invars, *jaxpr.constvars)}
  return sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize
             for v in jaxpr.outvars if id(v) not in held and hasattr(v.aval, 'shape'))


def compile_case(method: str, case: Case, args) -> tuple[Row, object]:
  from ssl_jax import experiment
  from ssl_jax.models import remat as remat_lib
  config = make_config(method, case, args.devices, args.image_size)
  mesh = make_mesh(case.fsdp)
  start = time.perf_counter()
  built = experiment.build(config, num_train_examples=config.batch_size * 1000,
                           image_channels=3, mesh=mesh)
  state = jax.eval_shape(built.init_fn, jax.random.PRNGKey(0))
  images = abstract_views(built, case.batch)
  options = remat_lib.CPU_COMPILER_OPTIONS if args.cpu_remat_options else None
  compiled = built.make_train_step().lower(state, images).compile(compiler_options=options)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  row = Row(case, args=memory.argument_size_in_bytes, temp=memory.temp_size_in_bytes,
            out=memory.output_size_in_bytes - memory.alias_size_in_bytes,
            gflop=float(cost['flops']) / 1e9, residuals=residual_bytes(built, case.batch),
            compile_s=seconds)
  return row, (built, compiled)


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measured_step_rss(built, compiled, batch: int) -> int:
  """Growth of resident memory while one step runs, per device: sampled every millisecond
  from before the call until it returns."""
  from ssl_jax import parallel
  state = built.init_state()
  rng = np.random.default_rng(0)
  views = tuple(rng.integers(0, 256, v.shape, np.uint8)
                for v in abstract_views(built, batch))
  images = parallel.global_batch_from_host(views, built.mesh)
  labels = parallel.global_batch_from_host(
      np.zeros((views[0].shape[0],), np.int32), built.mesh)
  jax.block_until_ready((state, images))
  before, peak, done = rss_bytes(), [0], threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], rss_bytes())
      time.sleep(0.001)

  sampler = threading.Thread(target=sample)
  sampler.start()
  try:
    jax.block_until_ready(compiled(state, images, labels, ()))
  finally:
    done.set()
    sampler.join()
  return max(0, peak[0] - before) // built.mesh.devices.size


def gib(n: float) -> str:
  return f'{n / GIB:.2f}'


def rows_table(rows: list[Row], with_rss: bool) -> str:
  head = ['model', 'dtype', 'remat', 'fsdp', 'batch/dev', 'args GiB', 'temp GiB', 'out GiB',
          'peak GiB', 'resid GiB', 'GFLOP/dev', 'compile s']
  if with_rss:
    head.append('RSS/dev GiB')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    c = r.case
    cells = [c.model, c.dtype, c.remat, str(c.fsdp), str(c.batch), gib(r.args), gib(r.temp),
             gib(r.out), gib(r.peak), gib(r.residuals), f'{r.gflop:.0f}', f'{r.compile_s:.0f}']
    if with_rss:
      cells.append('-' if r.rss is None else gib(r.rss))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def affine_fit(rows: list[Row]) -> tuple[float, float]:
  """(fixed bytes, bytes per example) of the line through the two smallest batches' peaks."""
  a, b = sorted(rows, key=lambda r: r.case.batch)[:2]
  slope = (b.peak - a.peak) / (b.case.batch - a.case.batch)
  return a.peak - slope * a.case.batch, slope


def largest_batch(rows: list[Row], budget: int) -> int | None:
  """The largest per-device batch whose peak fits `budget` bytes on `affine_fit`'s line;
  None if the fixed part alone does not fit."""
  fixed, slope = affine_fit(rows)
  if slope <= 0 or fixed > budget:
    return None
  return int((budget - fixed) // slope)


def fit_table(groups: dict, fits: dict, verified: dict, budgets: list[int]) -> str:
  head = ['model', 'dtype', 'remat', 'fsdp', 'fixed GiB', 'GiB per example']
  for g in budgets:
    head.append(f'batch/dev in {g} GiB')
    if verified:
      head.append('peak there GiB')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for key, rows in groups.items():
    fixed, slope = affine_fit(rows)
    cells = [key[0], key[1], key[2], str(key[3]), gib(fixed), f'{slope / GIB:.4f}']
    for g in budgets:
      n = fits[key, g]
      cells.append('-' if n is None else str(n))
      if verified:
        peak = verified.get((key, g))
        cells.append('-' if peak is None else gib(peak))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(args):
  cases = [Case(m, d, r, f, b) for m in args.models for d in args.dtypes for r in args.remat
           for f in args.fsdp for b in args.batches]
  for c in cases:  # fail before any compilation
    remat_policy(c.remat)
    if c.fsdp > 1:
      make_mesh(c.fsdp)
  print(f'{len(cases)} steps on {jax.device_count()} simulated {jax.devices()[0].platform} '
        f'devices, {args.method}, {args.image_size} px', flush=True)
  start = time.perf_counter()
  rows = []
  for case in cases:
    row, (built, compiled) = compile_case(args.method, case, args)
    if args.run:
      row.rss = measured_step_rss(built, compiled, case.batch)
    rows.append(row)
    print(f'  {case}: peak {gib(row.peak)} GiB, temp {gib(row.temp)} GiB, '
          f'{row.gflop:.0f} GFLOP, compiled in {row.compile_s:.0f} s', flush=True)
  print()
  print(rows_table(rows, args.run))

  groups: dict = {}
  for r in rows:
    groups.setdefault(r.case.group, []).append(r)
  groups = {k: v for k, v in groups.items() if len({r.case.batch for r in v}) >= 2}
  if groups:
    budgets = args.fit_gib
    fits = {(k, g): largest_batch(v, g * GIB) for k, v in groups.items() for g in budgets}
    verified = {}
    if args.verify:
      for (key, g), n in fits.items():
        if n:
          row, _ = compile_case(args.method, Case(*key, batch=n), args)
          verified[key, g] = row.peak
    print()
    print(fit_table(groups, fits, verified, budgets))
  print(f'\nwall time {time.perf_counter() - start:.0f} s', flush=True)


if __name__ == '__main__':
  main(_ARGS)
