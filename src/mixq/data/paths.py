"""Where datasets live on disk."""

from __future__ import annotations

import os
from pathlib import Path

from mixq.data.errors import DataError

__all__ = ["DATA_ENV_VAR", "resolve_data_dir"]

#: Environment variable naming the data directory when neither CLI nor config does.
DATA_ENV_VAR = "MIXQ_DATA"


def resolve_data_dir(
    cli_value: str | os.PathLike[str] | None, config_value: str | os.PathLike[str] | None
) -> Path:
    """Pick the data directory: CLI value, else config value, else ``$MIXQ_DATA``.

    Empty strings count as unset. ``~`` is expanded. The folder is not required to exist
    (loaders check and explain what belongs there).

    Args:
        cli_value: ``--data-dir`` from the command line, or ``None``.
        config_value: ``data_dir`` from the config file, or ``None``.

    Returns:
        The chosen directory.

    Raises:
        DataError: If none of the three is set.
    """
    for value in (cli_value, config_value, os.environ.get(DATA_ENV_VAR)):
        if value is not None and str(value) != "":
            return Path(value).expanduser()
    raise DataError(
        "no data directory given: pass --data-dir DIR, set data_dir in the config, or set "
        f"the {DATA_ENV_VAR} environment variable"
    )
