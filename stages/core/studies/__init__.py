"""Studies: grids of rows x seeds over the pipeline, each run a named DVC experiment (``langdml study NAME``),
and the table made from them (``langdml table NAME``). The files live beside this one (``<family>/<name>.yaml``);
the format is in :mod:`stages.core.study`."""
