"""Client side: ``ssh-to-job``, its ProxyCommand helper, and the ``stj`` pool commands."""
