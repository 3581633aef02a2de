"""How the compiled front (client/stj-front.c) starts the Python client: ``python -I -S
_boot.py SCRIPT ARGS...``, SCRIPT being the ``ssh-to-job-py`` console script beside it.

Isolated mode without the site module saves every cold session the site module and the
system's sitecustomize (3-5 ms here) and keeps the user's ``PYTHON*`` variables out of the
client. Without site, ``sys.path`` lacks site-packages: this file lives in it, three levels
up, so that is what goes on the path. Only ``os`` and ``sys`` (loaded at start-up anyway).
"""

import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.argv = sys.argv[1:]  # as the script itself would see them: [SCRIPT, ARGS...]
try:
    # ps and top name the process as they would a script: "ssh-to-job-py", not "python3".
    with open("/proc/self/comm", "w") as f:
        f.write(os.path.basename(sys.argv[0])[:15])
except OSError:
    pass

from ssh_to_job.client._mux import main  # noqa: E402 - the path above first

sys.exit(main())
