"""One NBD connection, split by the state each part owns (docs/architecture.md):

* shell.py: the asyncio protocol, its phases, shutdown and the lingering close;
* negotiation.py: the handshake under its deadline; starttls.py: the TLS upgrade;
* pump.py: transmission without asyncio or threads (receive buffer, streamed writes, requests
  in flight, the "may read?" and "finished?" rules); commands.py: what each command does;
* sinks.py: where replies go; serving.py: the serving thread that drives the pump;
* host.py: what a connection needs of its server.
"""

from nbdworker.connection.host import ConnectionHost
from nbdworker.connection.shell import NBDConnection

__all__ = ["ConnectionHost", "NBDConnection"]
