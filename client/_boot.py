"""How the compiled fronts (client/stj-front.c) start Python: ``python -I -S _boot.py SCRIPT
ARGS...``, SCRIPT being the console script beside the front: ``ssh-to-job-py`` (the client)
for ``ssh-to-job``, ``stj-py`` (the CLI) for ``stj``.

Isolated mode without the site module saves every cold session the site module and the
system's sitecustomize (3-5 ms here) and keeps the user's ``PYTHON*`` variables out of the
client. Without site, ``sys.path`` lacks site-packages: this file lives in it, three levels
up, so that is what goes on the path. Only ``os`` and ``sys`` (loaded at start-up anyway).
"""

import os
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.argv = sys.argv[1:]  # as the script itself would see them: [SCRIPT, ARGS...]
cli = os.path.basename(sys.argv[0]) == "stj-py"
if cli:
    # The CLI's messages name the command typed, `stj` (the front beside stj-py), not stj-py.
    sys.argv[0] = os.path.join(os.path.dirname(sys.argv[0]), "stj")
try:
    # ps and top name the process as they would a script: "ssh-to-job-py" or "stj", not
    # "python3" (pgrep -x stj still finds `stj pool`).
    with open("/proc/self/comm", "w") as f:
        f.write(os.path.basename(sys.argv[0])[:15])
except OSError:
    pass

# Only the entry point asked for (after the path above).
if cli:
    from ssh_to_job.client._qfast import main
else:
    from ssh_to_job.client._mux import main

sys.exit(main())
