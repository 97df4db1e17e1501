"""Design contract: the method core, data, config and training loop never import Ray or metrics code."""
import subprocess
import sys


def test_method_layers_do_not_import_ray():
    code = (
        "import sys, noprop_dist.core, noprop_dist.config, noprop_dist.data, noprop_dist.training, "
        "noprop_dist.shared_server, noprop_dist.checkpoint, noprop_dist.evaluate; "
        "bad = [m for m in ('ray', 'prometheus_client') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
