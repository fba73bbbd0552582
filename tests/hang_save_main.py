"""Test-only: `python -m ssl_jax.main` whose asynchronous checkpoint save of any step at or
after $HANG_SAVE_FROM_STEP never completes, so that a test can SIGKILL the process in the
middle of that save (tests/test_preemption.py).

The save runs as usual (the step's data is written into orbax's temporary directory,
`<step>.orbax-checkpoint-tmp-*`) until orbax's background thread reaches its commit (the
rename to `<step>`); there this prints 'HANGING SAVE <step>' to stderr and blocks. The
training program itself is unmodified. Orbax 0.12's private `_on_commit_callback` is the hook:
if a later orbax renames it, this fails loudly rather than letting the save complete.

Usage: HANG_SAVE_FROM_STEP=4 python tests/hang_save_main.py --config=... --workdir=...
"""

import os
import sys
import time

from orbax.checkpoint._src.checkpointers import async_checkpointer

HANG_FROM = int(os.environ['HANG_SAVE_FROM_STEP'])
_commit = async_checkpointer._on_commit_callback  # noqa: SLF001 (raises if orbax renamed it)


def _hanging_commit(tmpdir, *args, **kwargs):
  step = tmpdir.get_final().name
  if step.isdigit() and int(step) >= HANG_FROM:
    sys.stderr.write(f'HANGING SAVE {step} in {tmpdir.get()}\n')
    sys.stderr.flush()
    while True:
      time.sleep(60)
  return _commit(tmpdir, *args, **kwargs)


async_checkpointer._on_commit_callback = _hanging_commit  # noqa: SLF001

if __name__ == '__main__':
  from ssl_jax import main
  main.run()
