"""What the command-line programs (ssl-jax-train, ssl-jax-evaluate) share.

- **A short log.** By default the log holds ssl_jax's own lines (progress, evaluations,
  results) and WARNING or worse from everything; the INFO chatter of orbax (dozens of lines
  per checkpoint), jax, absl, clu, grain, matplotlib and TensorFlow's C++ start-up is
  dropped. Giving absl's `--verbosity` (`-v`) explicitly shows everything absl would
  (`--verbosity=0`: INFO from every library; `1`: also debug lines).
- **One message for a mistake.** A typo in a `--config.FIELD` override or an invalid config
  (`config_lib.ConfigError`) ends the program with exit code 1 and one message naming the
  problem and its fix, without a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging as std_logging
import os
import re
import sys
import tempfile
import textwrap

from absl import app, flags, logging
from ml_collections import config_dict

from ssl_jax import config_lib

FLAGS = flags.FLAGS
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Scalars that clu's LoggingWriter logs and that are evaluations rather than training
# progress (the progress itself is ssl_jax.train's 'step N/M: loss ...' line).
EVALUATION_SCALARS = ('knn_top1', 'final/', 'diagnostics/', 'image_text/')
_VERBOSITY_FLAG = re.compile(r'^--?(verbosity|v)(=|$)')


@functools.lru_cache(maxsize=None)
def _is_ssl_jax_file(pathname: str) -> bool:
  return os.path.abspath(pathname).startswith(_PACKAGE_DIR)


def _is_evaluation(record: std_logging.LogRecord) -> bool:
  """clu's LoggingWriter.write_scalars line of an evaluation ('[40] knn_top1=0.51')."""
  if record.funcName != 'write_scalars' or 'clu' not in record.pathname:
    return False
  scalars = str(record.args[-1]) if isinstance(record.args, tuple) and record.args else ''
  return any(name.startswith(EVALUATION_SCALARS) for name in scalars.split(', '))


class QuietLibraries(std_logging.Filter):
  """Keeps WARNING and worse from everyone, INFO and below only from ssl_jax (and the
  evaluation scalars clu logs for it)."""

  def filter(self, record):
    return (record.levelno >= std_logging.WARNING or _is_ssl_jax_file(record.pathname) or
            _is_evaluation(record))


# The C++ INFO lines TensorFlow writes straight to file descriptor 2 while it loads ('I0000
# 00:00:... port.cc:153] oneDNN custom operations are on...'), and absl's C++ notice before
# them. TensorFlow 2.21 logs them through absl's C++ logging, which ignores
# TF_CPP_MIN_LOG_LEVEL.
_NATIVE_INFO = re.compile(r'^(I\d{4} [\d:.]+ +\d+ [^\]]+\] |'
                          r'WARNING: All log messages before absl::InitializeLog\(\) is called)')
_NATIVE_LINE_START = re.compile(r'^([IWEF]\d{4} |WARNING|ERROR|Traceback)')
_quiet = False


@contextlib.contextmanager
def native_info_dropped():
  """While quiet (no --verbosity), drops native INFO lines written to stderr in the block
  (e.g. `import tensorflow`); everything else written there is passed on afterwards."""
  if not _quiet:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      dropping = False
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        # A line that does not start a log line continues the one before it.
        dropping = bool(_NATIVE_INFO.match(line) or
                        (dropping and not _NATIVE_LINE_START.match(line)))
        if not dropping:
          sys.stderr.write(line)
      sys.stderr.flush()


def verbosity_given(argv) -> bool:
  """Whether argv sets absl's --verbosity (or -v), before the flags are parsed."""
  for arg in argv[1:]:
    if arg == '--':
      break
    if _VERBOSITY_FLAG.match(arg):
      return True
  return False


def quiet_logging(argv) -> None:
  """The default short log, unless --verbosity was given: TensorFlow/XLA C++ INFO lines off
  (before anything imports them) and library INFO lines filtered out of absl's handler."""
  global _quiet
  if verbosity_given(argv):
    return
  _quiet = True
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  handler = logging.get_absl_handler().python_handler
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())


# ---- config errors -------------------------------------------------------------------------

def _flag_value(argv, name: str) -> str | None:
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == '--':
      break
    for prefix in (f'--{name}=', f'-{name}='):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
    if arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _override_paths(argv, name: str) -> list[str]:
  """The FIELD of every --NAME.FIELD[=VALUE] (and --noNAME.FIELD) in argv."""
  paths = []
  for arg in argv[1:]:
    if arg == '--':
      break
    flag = arg.lstrip('-').split('=', 1)[0]
    for prefix in (f'{name}.', f'no{name}.'):
      if arg.startswith('-') and flag.startswith(prefix):
        paths.append(flag[len(prefix):])
  return paths


def _all_paths(config, prefix: str = '') -> list[str]:
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, (config_dict.ConfigDict, dict)):
      paths += _all_paths(value, f'{prefix}{key}.')
  return paths


def unknown_field_message(config, path: str) -> str | None:
  """'Unknown config field a.bb; did you mean a.b?' when `path` is not a field of `config`,
  else None."""
  node, parts = config, path.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      return None  # below a leaf (e.g. an index into a tuple): not ours to judge
    if part in node:
      node = node[part]
      continue
    parent, rest = '.'.join(parts[:i]), '.'.join(parts[i:])
    everywhere = _all_paths(config)
    guess = [p for p in everywhere if p.endswith('.' + rest)]  # --config.base_lr
    for near in difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.6):
      fixed = '.'.join(parts[:i] + [near] + parts[i + 1:])
      guess.append(fixed if fixed in everywhere else '.'.join(parts[:i] + [near]))
    if guess:
      return f'Unknown config field {path}; did you mean {guess[0]}?'
    where = f'{parent} has' if parent else 'the config has'
    return (f'Unknown config field {path}; {where} the fields '
            f'{", ".join(sorted(node.keys()))}.')
  return None


def _innermost(error: BaseException, kind) -> BaseException | None:
  found, seen = None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, kind):
      found = error
    error = error.__cause__ or error.__context__
  return found


def config_error_message(error: BaseException, argv, config_flag: str | None) -> str | None:
  """The one message for a flag-parsing error that is a config mistake, else None."""
  config_error = _innermost(error, config_lib.ConfigError)
  if config_error is not None:  # raised by the config file, e.g. an unknown ':ARG' key
    return str(config_error)
  if config_flag is None or not isinstance(error, (KeyError, AttributeError)):
    return None
  try:  # the config as loaded before the overrides (the flag's parser loads the file)
    config = FLAGS[config_flag].parser.parse(_flag_value(argv, config_flag))
  except Exception:  # pylint: disable=broad-except
    return None
  problems = [m for m in (unknown_field_message(config, p)
                          for p in _override_paths(argv, config_flag)) if m]
  return '\n'.join(problems) or None


def parse_flags(argv, config_flag: str | None = None):
  """absl's flag parsing, with one clean message for config mistakes; sets up the log."""
  try:
    remaining = FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except
    message = config_error_message(error, argv, config_flag)
    if message is not None:
      sys.stderr.write(message + '\n')
      sys.exit(1)
    if not isinstance(error, flags.Error):
      raise
    # What absl's app.parse_flags_with_usage prints.
    message = str(error)
    sys.stderr.write(f'FATAL Flags parsing error:\n{textwrap.indent(message, "  ")}\n'
                     if '\n' in message else f'FATAL Flags parsing error: {message}\n')
    sys.stderr.write('Pass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)
  quiet_logging(argv)
  return remaining


def run(main, config_flag: str | None = None) -> None:
  """app.run(main) with the short log and one message, no traceback, for a config error."""

  def main_without_traceback(argv):
    try:
      return main(argv)
    except Exception as error:  # pylint: disable=broad-except
      # Also one raised in an input thread and re-raised by grain around it.
      config_error = _innermost(error, config_lib.ConfigError)
      if config_error is None:
        raise
      sys.stderr.write(f'{config_error}\n')
      sys.exit(1)

  if not verbosity_given(sys.argv):
    # Before anything imports TensorFlow or jaxlib, whose C++ logging reads it once.
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  app.run(main_without_traceback,
          flags_parser=functools.partial(parse_flags, config_flag=config_flag))
