"""Scale-out helpers for flows: the DeepSpeed hostfile a multi-node training run launches on.

DeepSpeed's launcher reads a hostfile of `<host> slots=<ranks>` lines (DeepSpeed docs,
"Resource Configuration (multi-node)"). The task writes one for the hosts a work pool or a
scheduler handed out; `pretrain.train.distributed.hostfile` (and `launcher: deepspeed`)
then points the trainer at it, and `components.train.launch` passes it to `deepspeed`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from prefect import task

from components.errors import ConfigError

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?$")


def hostfile_text(hosts: Sequence[str], slots_per_host: int) -> str:
    """`<host> slots=<n>` per host, in order (rank 0 runs on the first host)."""
    if slots_per_host < 1:
        raise ConfigError(f"slots_per_host: must be at least 1 (got {slots_per_host})")
    if not hosts:
        raise ConfigError("hosts: at least one host is needed")
    for host in hosts:
        if not _HOSTNAME.match(host):
            raise ConfigError(f"hosts: {host!r} is not a host name or address")
    duplicates = sorted({host for host in hosts if list(hosts).count(host) > 1})
    if duplicates:
        raise ConfigError(f"hosts: listed more than once: {duplicates}")
    return "".join(f"{host} slots={slots_per_host}\n" for host in hosts)


@task(name="deepspeed-hostfile")
def deepspeed_hostfile(path: str, slots_per_host: int, hosts: Sequence[str] = ("localhost",)) -> str:
    """Write the hostfile atomically (a launcher never reads half of one) and return its path."""
    text = hostfile_text(hosts, slots_per_host)
    target = Path(path).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(staging, target)
    return str(target)
