"""Run a test script in a subprocess that sees N forced CPU devices."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_with_devices(num_devices: int) -> dict:
  """This process's environment (its XLA_FLAGS kept, see conftest.py) with
  ``num_devices`` forced host devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={num_devices}")
  return dict(os.environ, XLA_FLAGS=" ".join(flags))


def run(script: str, num_devices: int = 4, timeout: int = 900) -> dict:
  """Runs ``script`` with ``num_devices`` host devices; returns the JSON it
  printed on its ``RESULT `` line (the script's stderr on failure)."""
  env = env_with_devices(num_devices)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][0]
  return json.loads(line[len("RESULT "):])
