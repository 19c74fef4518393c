"""Convert an official EDM / FDM snapshot (``network-snapshot-*.pkl``) for fdm_fast, running none of
its code (fdm_fast.official reads it with a restricted unpickler):

    python -m fdm_fast.convert network-snapshot-200000.pkl converted/

writes into the folder ``network-snapshot.pt`` (an fdm_fast snapshot: EMA weights + config),
``model.safetensors`` (the weights, the format the hub ecosystem reads, with the config in its
metadata), each with its SHA-256 beside it (verified on load), and ``config.json`` (the fdm_fast
config). ``python -m fdm_fast.generate --network`` takes either network file, or the ``.pkl`` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .official import OfficialFormatError, is_zip_archive, load_official, save_safetensors, to_fdm_fast
from .snapshots import atomic_save, cannot_write_in, write_checksum


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fdm_fast.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="an official network-snapshot-*.pkl (EDM or FDM)")
    ap.add_argument("outdir", help="folder for network-snapshot.pt, model.safetensors and config.json")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.source):
        print(f"error: {args.source}: no such file", file=sys.stderr)
        return 2
    try:
        config, state = to_fdm_fast(load_official(args.source))
        from .nn import build_denoiser

        net = build_denoiser(config)
        net.load_state_dict(state)  # strict: every official tensor has its place
    except (OfficialFormatError, RuntimeError) as e:
        hint = ("; an fdm_fast snapshot needs no conversion: generate --network and fid calc --network take it as "
                "it is") if is_zip_archive(args.source) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    why = cannot_write_in(args.outdir)
    if why is not None:
        print(f"error: {args.outdir}: {why}", file=sys.stderr)
        return 2
    ema = net.state_dict()
    atomic_save(dict(config=config, ema=ema, step=0, cur_nimg=0), os.path.join(args.outdir, "network-snapshot.pt"))
    st = os.path.join(args.outdir, "model.safetensors")
    save_safetensors(ema, st, metadata=dict(fdm_fast_config=json.dumps(config), source=os.path.basename(args.source)))
    write_checksum(st)  # verified on load, as every .pt of fdm_fast is
    with open(os.path.join(args.outdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{args.source}: {config['source']['precond_class']} ({config['precond']}, "
          f"{config['precond_options']}) with a {config['arch']} network -> {os.path.join(args.outdir, '')}"
          "{network-snapshot.pt, model.safetensors, config.json} (each .pt and .safetensors with its .sha256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
