"""``medrag``: one console script whose verbs mirror the jobs.

    medrag index manifest {folder,r2gen,dicom} ...   write a manifest from what you have
    medrag index build MANIFEST --index URI ...      encode and publish an index version (resumable)
    medrag index add MANIFEST --index URI            add/replace studies;  index delete --study ID ...
    medrag index info --index URI                    what an index holds
    medrag search --index URI (--image F | --study ID | --text T) [--anatomy A] [--finding F]
    medrag serve --index URI --api-keys FILE [--port 8000]       the API and the web page
    medrag train MANIFEST --out DIR [--preset cpu-small|gpu]   train medrag-native
    medrag draft --index URI --image F [--prior-image P --prior-report R] [--generator ...]
    medrag eval {retrieval,draft,load,speed,entities,synth} ... measure

User errors (unknown anatomy, missing file, wrong index) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from api.cli import draft, evaluate, index, search, serve, train
from api.cli.common import EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # pydicom reports every slightly-off header value of real archives; medrag reports what it
    # actually skips, file by file, instead.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    from indexer.manifest import ManifestError
    from indexer.segments import BuildLockedError
    from indexer.sources.dicomweb import DicomWebError
    from retrieval.encoders import EncoderError
    from retrieval.imaging.images import ImageLoadError
    from retrieval.index import IndexError_
    from retrieval.rag.http import GeneratorError
    from retrieval.search import SearchError
    from retrieval.taxonomy import UnknownTermError

    try:
        return int(args.func(args) or 0)
    except (DicomWebError, UnknownTermError, ImageLoadError, ManifestError, EncoderError, IndexError_, SearchError,
            GeneratorError, BuildLockedError, FileNotFoundError, ValueError) as exc:
        print(f"medrag: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medrag", description="medical image retrieval and report drafting")
    sub = p.add_subparsers(metavar="COMMAND")
    for verb in (index, train, evaluate, serve, draft, search):  # the order `medrag --help` lists them
        verb.register(sub)
    return p


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
