"""Smart Meter Texas ingest droplet for IntelliWatt.

One package, several doors: the ``smt-droplet`` command (systemd units on the droplet), the
Ansible modules in ``library/`` (shipped to the target through ``module_utils``) and the tests.
Importing the package itself pulls in no third-party library; the modules that need paramiko,
requests or aiohttp import them where they are used.
"""

__version__ = "0.1.0"
