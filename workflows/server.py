"""The tutorial's ``server.py``: the streaming callbacks wired by hand behind a 0MQ dispatcher.

Documents published to a bluesky 0MQ proxy (by a RunEngine, or by
``crystalmapping publish --fill`` for a stored run) go through
``ImageProcessor -> PeakTracker -> TrackLinker``; the peaks and the linked
tracks are recorded as derived runs in a second catalog, ``DB2``. The callbacks
need the frames inside the events, so publish stored runs with ``--fill``.

Run it with the tutorial's values (``python server.py``), or say where things
are with options or environment variables::

    bluesky-0MQ-proxy --in-address 127.0.0.1:5567 --out-address 127.0.0.1:5568 &
    python workflows/server.py --address localhost:5568 --background bg.npy \\
        --catalog sqlite:///analysis/catalog.db &
    crystalmapping publish --uid <uid> --address localhost:5567 --fill

    option          environment variable             default
    --address       CRYSTALMAPPING_ADDRESS           localhost:5568
    --prefix        CRYSTALMAPPING_PREFIX            raw
    --background    CRYSTALMAPPING_BACKGROUND        ./data/PARAMID-2_background_1.npy
    --catalog       CRYSTALMAPPING_DB2               the per-user embedded catalog
    --data-key      CRYSTALMAPPING_DATA_KEY          dexela_image
    --serializer    CRYSTALMAPPING_SERIALIZER        msgpack

``--diameter``, ``--percentile``, ``--separation`` and ``--search-range`` are
the tutorial's trackpy keywords (15, 80, 100, 50). Documents arrive as msgpack;
messages that do not decode are logged and skipped, and the log says how many
and why (a stock bluesky ``Publisher`` sends pickle: publish with
``serializer=crystalmapping.wire.packb``, or, on a trusted network only, start
this server with ``--serializer pickle``). Stop it with Ctrl-C or SIGTERM.
"""

import argparse
import logging
import os
import signal
import sys

import numpy as np
from bluesky.callbacks.best_effort import BestEffortCallback

from crystalmapping import Catalog
from crystalmapping.callbacks import ImageProcessor, PeakTrackor, TrackLinker
from crystalmapping.dispatch import RemoteDispatcher
from crystalmapping.wire import SERIALIZERS, serialization


def _arguments(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=env("CRYSTALMAPPING_ADDRESS", "localhost:5568"),
                        help="the proxy's output, host:port")
    parser.add_argument("--prefix", default=env("CRYSTALMAPPING_PREFIX", "raw"))
    parser.add_argument("--background",
                        default=env("CRYSTALMAPPING_BACKGROUND",
                                    "./data/PARAMID-2_background_1.npy"),
                        help=".npy file of the image to subtract (dark current + air scatter)")
    parser.add_argument("--catalog", default=env("CRYSTALMAPPING_DB2"),
                        help="DB2: where the derived runs are recorded")
    parser.add_argument("--data-key", default=env("CRYSTALMAPPING_DATA_KEY", "dexela_image"))
    parser.add_argument("--diameter", type=int, default=15)
    parser.add_argument("--percentile", type=float, default=80)
    parser.add_argument("--separation", type=float, default=100)
    parser.add_argument("--search-range", type=float, default=50)
    parser.add_argument("--serializer", choices=SERIALIZERS,
                        default=env("CRYSTALMAPPING_SERIALIZER", "msgpack"),
                        help="how the publisher encodes documents: msgpack (safe), or pickle "
                             "(bluesky's default; only on a trusted network: whoever reaches "
                             "the proxy can run code here)")
    return parser.parse_args(argv)


def _load_background(path):
    """The background image, or exit with what is missing and how to give it."""
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        sys.exit(f"server.py: no background image at {path!r}. Give the .npy file of an "
                 "empty grid point's mean frame with --background PATH (or "
                 "CRYSTALMAPPING_BACKGROUND); save one with numpy.save.")
    except (OSError, ValueError) as exc:
        sys.exit(f"server.py: cannot read the background image {path!r} ({exc}). It must be "
                 "a .npy array saved with numpy.save, without Python objects.")


args = _arguments()
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
if args.serializer == "pickle":
    logging.getLogger("server").warning(
        "documents are unpickled (--serializer pickle): anyone who can reach the proxy at %s "
        "can run code in this process. Use it on a trusted network only.", args.address)

# load the image to use
image = _load_background(args.background)

# the database for the processed data
DB2 = Catalog(args.catalog)

# create a remote dispatcher to receive the dispatch the data
host, port = args.address.rsplit(":", 1)
rd = RemoteDispatcher(address=(host, int(port)), prefix=args.prefix.encode(),
                      deserializer=serialization(args.serializer)[1])

# create the callback
ip = ImageProcessor(args.data_key, subtrahend=image)
pt = PeakTrackor(args.data_key, diameter=args.diameter, percentile=args.percentile,
                 separation=args.separation)
tl = TrackLinker(db=DB2, search_range=args.search_range)
bec = BestEffortCallback()
bec.disable_plots()
tl.subscribe(DB2.insert)
pt.subscribe(tl)
pt.subscribe(DB2.insert)
ip.subscribe(pt)
ip.subscribe(bec)

# subscribe the callback to the dispatcher
rd.subscribe(ip)


def _stop(signum, frame):
    raise KeyboardInterrupt


# start the server
if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    print("Start the server ...", flush=True)
    try:
        rd.start()
    except KeyboardInterrupt:
        print("Server stopped.", flush=True)
