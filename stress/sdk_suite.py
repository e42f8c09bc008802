"""Run the pinned SDK's own test suite against ``aperturedb-pool serve --tls``.

    python stress/sdk_suite.py [--version 0.5.3] [--workdir DIR] [--module test_Utils ...]
                               [--timeout 600] [--keep]

The test modules come from the SDK's sdist on PyPI (``pip download --no-deps
--no-binary :all: aperturedb==VERSION``, its ``test/`` folder). The suite's
``conftest.py``, ``dbinfo.py``, ``pytest.ini`` and input generators live only in
the SDK's git repository, which a PyPI-only machine cannot reach, so this script
writes its own: a ``db`` fixture that connects over TLS with the server's
generated CA and hostname checking and empties the database with
``Utils.remove_all_objects()`` (as the suite's fixture does); ``utils``,
``config``, ``images``, ``retired_persons`` and the loader fixtures
``insert_data_from_csv``/``modify_data_from_csv``; and input files in the
SDK's documented CSV formats (``write_inputs``). A test that needs an input
file not generated here (URL lists, image update variants) is skipped, naming
the file.

Each module runs in its own pytest process against a fresh server process.
Tests marked as needing the internet, cloud or Kaggle credentials or the REST
interface are skipped and listed; the torch, tensorflow, CLIP and Kaggle
modules are not run (listed too). Prints one line per module
(passed/failed/errors/skipped, first the tests that use the ``db`` fixture,
then the others), the totals, and the skipped tests with their reasons. The
exit status is 0 when it ran, whatever the counts (it measures; it does not
gate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aperturedb_pool.testing.process import ServerProcess  # noqa: E402

OUTCOMES = ("passed", "failed", "error", "skipped")

# Modules that need packages or accounts this environment does not have.
NOT_RUN = {
    "test_torch_connector": "needs torch",
    "test_tf_connector": "needs tensorflow",
    "test_kaggle": "needs Kaggle credentials and the internet",
    "test_SPARQL": "imports the CLIP transformer: needs torch and openai-clip",
}

# Markers of the suite's pytest.ini, and why a test carrying one is skipped here.
SKIP_MARKERS = {
    "external_network": "needs the internet",
    "remote_credentials": "needs cloud credentials",
    "kaggle": "needs Kaggle credentials",
    "http": "uses the REST interface (the embedded server speaks the native protocol only)",
}

# Our own conftest for the suite: the fixtures its modules ask for, written for this
# run (the repository's conftest is not reachable from PyPI).
_CONFTEST = '''\
"""Fixtures for the SDK suite run by aperturedb-pool's stress/sdk_suite.py."""
import json
import os

import pytest

import dbinfo

SKIP_MARKERS = {skip_markers!r}
NEEDS_INPUT = ("needs an input file of the suite that stress/sdk_suite.py does not "
               "generate (the SDK repository's generateInput.py makes them)")


_USES_DB = {{}}
_OUTCOME = {{}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        _USES_DB[item.nodeid] = "db" in item.fixturenames
        for name, why in SKIP_MARKERS.items():
            if item.get_closest_marker(name) is not None:
                item.add_marker(pytest.mark.skip(reason=why))
                break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A test that opens an input file this run did not generate is not a failure of
    # the server: report it as skipped, naming the file.
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo
    if exc is not None and exc.errisinstance(FileNotFoundError) and "input/" in str(exc.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), 0, "Skipped: " + NEEDS_INPUT + ": "
                           + os.path.basename(getattr(exc.value, "filename", "") or ""))


def pytest_runtest_logreport(report):
    # One outcome per test: an error in setup or teardown, else the call's.
    if report.when == "call" or report.outcome != "passed":
        if report.skipped:
            outcome = "skipped"
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
        else:
            outcome = "passed"
        if _OUTCOME.get(report.nodeid, (None,))[0] not in ("failed", "error"):
            why = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) \
                else ""
            _OUTCOME[report.nodeid] = (outcome, why)


def pytest_collectreport(report):
    if report.failed:  # a module that cannot even be imported counts as one error
        _OUTCOME[report.nodeid or "collection"] = ("error", "")


def pytest_sessionfinish(session):
    with open(os.environ["SDK_SUITE_RESULTS"], "w") as f:
        for nodeid, (outcome, why) in _OUTCOME.items():
            f.write(json.dumps({{"test": nodeid, "outcome": outcome, "why": why,
                                "db": _USES_DB.get(nodeid, False)}}) + "\\n")


def pytest_generate_tests(metafunc):
    # One connector kind: the native protocol over TLS ("TCP" as in the suite's ids).
    if "db" in metafunc.fixturenames:
        metafunc.parametrize("db", [pytest.param("tcp", marks=pytest.mark.tcp)],
                             indirect=True, ids=["TCP"])


def _connector():
    from aperturedb.Connector import Connector
    return Connector(host=dbinfo.DB_TCP_HOST, port=dbinfo.DB_TCP_PORT,
                     user=dbinfo.DB_USER, password=dbinfo.DB_PASSWORD, use_ssl=True,
                     ca_cert=dbinfo.CA_CERT, verify_hostname=dbinfo.VERIFY_HOSTNAME,
                     retry_max_attempts=3, retry_interval_seconds=0)


@pytest.fixture()
def db(request):
    from aperturedb.Utils import Utils
    conn = _connector()
    assert Utils(conn).remove_all_objects()
    yield conn
    conn.close()


@pytest.fixture()
def utils(db):
    from aperturedb.Utils import Utils
    return Utils(db)


@pytest.fixture()
def config():
    return {{"first": {{"host": dbinfo.DB_TCP_HOST, "port": dbinfo.DB_TCP_PORT,
                       "username": dbinfo.DB_USER, "password": dbinfo.DB_PASSWORD,
                       "name": "first", "use_ssl": True, "use_rest": False}},
            "active": "first"}}


def _loader_class(path):
    """The SDK's CSV class for one of the input files stress/sdk_suite.py writes."""
    from aperturedb import (BBoxDataCSV, BlobDataCSV, ConnectionDataCSV,
                            DescriptorDataCSV, DescriptorSetDataCSV, EntityDataCSV,
                            ImageDataCSV)
    from aperturedb.EntityUpdateDataCSV import SingleEntityUpdateDataCSV

    class PersonUpdates(SingleEntityUpdateDataCSV):
        def __init__(self, filename, **kwargs):
            super().__init__("Person", filename, **kwargs)

    name = os.path.basename(path)
    if not os.path.exists(path):
        pytest.skip(NEEDS_INPUT + f": {{name}} is not generated")
    if name.startswith("persons-update"):
        return PersonUpdates
    for prefix, cls in (("images_updateif", ImageDataCSV.ImageUpdateDataCSV),
                        ("images_forceupdate", ImageDataCSV.ImageForceNewestDataCSV),
                        ("images_sparseload", ImageDataCSV.ImageSparseAddDataCSV)):
        if name.startswith(prefix):
            return cls
    for prefix, cls in (("persons", EntityDataCSV.EntityDataCSV),
                        ("images", ImageDataCSV.ImageDataCSV),
                        ("connections", ConnectionDataCSV.ConnectionDataCSV),
                        ("bboxes", BBoxDataCSV.BBoxDataCSV),
                        ("blobs", BlobDataCSV.BlobDataCSV),
                        ("descriptorset", DescriptorSetDataCSV.DescriptorSetDataCSV),
                        ("set", DescriptorDataCSV.DescriptorDataCSV)):
        if name.startswith(prefix):
            return cls
    pytest.skip(NEEDS_INPUT + f": no loader for {{name}}")


@pytest.fixture()
def insert_data_from_csv(db):
    from aperturedb.ParallelLoader import ParallelLoader

    def insert(in_csv_file, rec_count=-1, expected_error_count=0, loader_result_lambda=None):
        data = _loader_class(in_csv_file)(in_csv_file, blobs_relative_to_csv=True)
        if rec_count != -1:
            data = data[:rec_count]
        loader = ParallelLoader(db)
        loader.ingest(data, batchsize=100, numthreads=4, stats=False)
        assert loader.error_counter == 0
        # The loader creates an index for each constraint property; the server must
        # list every one of them back (GetIndexes).
        if hasattr(data, "get_indices"):
            have = loader.get_existing_indices()
            for target, classes in data.get_indices().items():
                for cls, props in classes.items():
                    missing = set(props) - have.get(target, {{}}).get(cls, set())
                    assert not missing, f"no index on {{target}} {{cls}} {{missing}}: {{have}}"
        assert len(data) - loader.get_succeeded_queries() == expected_error_count
        if loader_result_lambda is not None:
            loader_result_lambda(loader, data)
        return data, loader

    return insert


@pytest.fixture()
def modify_data_from_csv(db):
    from aperturedb.ParallelQuerySet import ParallelQuerySet

    def modify(in_csv_file, rec_count=-1):
        data = _loader_class(in_csv_file)(in_csv_file, blobs_relative_to_csv=True)
        if rec_count != -1:
            data = data[:rec_count]
        querier = ParallelQuerySet(db)
        querier.query(data, batchsize=99, numthreads=1, stats=False)
        assert querier.error_counter == 0
        return data, querier

    return modify


@pytest.fixture()
def images(insert_data_from_csv):
    return insert_data_from_csv("./input/images.adb.csv")


@pytest.fixture()
def retired_persons(db, insert_data_from_csv, utils):
    from aperturedb.Constraints import Constraints
    from aperturedb.Entities import Entities
    from aperturedb.Query import Query

    utils.remove_entities(class_name="Person")
    insert_data_from_csv("./input/persons.adb.csv")
    sixty_plus = Constraints()
    sixty_plus.greaterequal("age", 60)
    return Entities.retrieve(db, spec=Query.spec(with_class="Person", constraints=sixty_plus))
'''

_DBINFO = '''\
"""Where the SDK suite finds the server (written by stress/sdk_suite.py)."""
import os

DB_TCP_HOST = "127.0.0.1"
DB_REST_HOST = "127.0.0.1"
DB_TCP_PORT = int(os.environ["SDK_SUITE_PORT"])
DB_REST_PORT = 443
DB_USER = "admin"
DB_PASSWORD = "admin"
CA_CERT = os.environ["SDK_SUITE_CA"]
VERIFY_HOSTNAME = True
'''

_PYTEST_INI = """\
[pytest]
pythonpath = .
markers =
{markers}
    slow: slow running test
    tcp: uses the native protocol
    dask: uses dask
"""


def fetch_tests(version: str, workdir: Path) -> Path:
    """Download and unpack the sdist once; return its ``test`` folder."""
    tests = workdir / f"aperturedb-{version}" / "test"
    if tests.is_dir():
        return tests
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                    ":all:", f"aperturedb=={version}", "-d", str(workdir)], check=True)
    sdist = workdir / f"aperturedb-{version}.tar.gz"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(f"aperturedb-{version}/test/")
                   and ".." not in m.name.split("/") and (m.isfile() or m.isdir())]
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse unsafe members too
            tar.extractall(workdir, members=members, filter="data")
        else:  # pragma: no cover - older 3.10: the checks above are the filter
            tar.extractall(workdir, members=members)
    if not tests.is_dir():
        raise SystemExit(f"{sdist} has no test/ folder")
    return tests


def write_inputs(tests: Path, seed: int = 19) -> None:
    """Our own input files for the suite's loaders, in the SDK's documented CSV formats.

    Persons (with update and partial-overlap variants), blobs, images (small PNGs),
    person-image connections, bounding boxes (one set repeating one box under a
    constraint), two descriptor sets and their descriptors. Files the suite reads
    but this does not write (URL lists, image update variants) make their tests skip.
    """
    import cv2
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    inp = tests / "input"
    for sub in ("", "images", "blobs"):
        (inp / sub).mkdir(parents=True, exist_ok=True)

    def ids(n: int) -> list[int]:
        return sorted(int(x) for x in rng.choice(10**9, size=n, replace=False))

    first = ["Ada", "Bo", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hal"]
    last = ["North", "South", "East", "West", "Stone"]
    n = 400
    persons = pd.DataFrame({
        "EntityClass": "Person",
        "name": [first[i % len(first)] for i in range(n)],
        "lastname": [last[(i // len(first)) % len(last)] for i in range(n)],
        "id": ids(n),
        "age": rng.integers(0, 100, size=n),
        "height": rng.uniform(0, 200, size=n).round(3),
    })
    persons["has_dog"] = persons["height"] > 100
    persons["date:dob"] = "2001-02-03T04:05:06"
    persons["constraint_id"] = persons["id"]
    persons.to_csv(inp / "persons.adb.csv", index=False)
    persons.head(10).to_csv(inp / "persons-exist-base.adb.csv", index=False)
    persons.iloc[7:12].to_csv(inp / "persons-some-exist.adb.csv", index=False)  # 3 overlap

    # Conditional updates: version 1 stored; same version changes nothing; a newer
    # version updates; "age > 30" updates only the older persons.
    upd = persons.copy()
    upd["updateif_<version_id"] = 1
    upd["version_id"] = 1
    upd.to_csv(inp / "persons-update.adb.csv", index=False)
    upd["age"] = upd["age"] + 200
    upd["version_id"] = 2
    upd.to_csv(inp / "persons-update-oldversion.adb.csv", index=False)
    upd["updateif_<version_id"] = 2
    upd.to_csv(inp / "persons-update-newversion.adb.csv", index=False)
    older = persons.copy()
    older["age"] = older["age"] + 200
    older["updateif_>age"] = 30
    older.to_csv(inp / "persons-update-olderage.adb.csv", index=False)

    values = np.array([1.25, 2.5, 3.3, 4.75, 8.0], dtype=np.float64)  # [2] == 3.3
    blob_files = []
    for i in range(20):
        name = f"blobs/{i:04d}.blob"
        values.tofile(inp / name)
        blob_files.append(name)
    blobs = pd.DataFrame({"filename": [blob_files[i % 20] for i in range(100)],
                          "license": [i // 20 for i in range(100)], "id": ids(100)})
    blobs["constraint_id"] = blobs["id"]
    blobs.to_csv(inp / "blobs.adb.csv", index=False)

    image_files = []
    for i in range(40):
        name = f"images/{i:04d}.png"
        pixels = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        ok, png = cv2.imencode(".png", pixels)
        assert ok
        (inp / name).write_bytes(png.tobytes())
        image_files.append(name)
    m = 200
    images = pd.DataFrame({"filename": [image_files[i % 40] for i in range(m)],
                           "license": [i // 40 for i in range(m)], "id": ids(m),
                           "age": rng.integers(0, 100, size=m),
                           "height": rng.uniform(0, 200, size=m).round(3)})
    images["has_dog"] = images["height"] > 100
    images["date:date_captured"] = "2020-05-06T07:08:09"
    images["constraint_id"] = images["id"]
    images.to_csv(inp / "images.adb.csv", index=False)

    links = [(img, per) for img in images["id"][::20] for per in persons["id"][::40]]
    connections = pd.DataFrame(links, columns=["_Image@id", "Person@id"])
    connections.insert(0, "ConnectionClass", "has_image")
    connections["confidence"] = rng.uniform(size=len(links)).round(4)
    connections.to_csv(inp / "connections-persons-images.adb.csv", index=False)

    labels = ["dog", "cat", "owl", "fox"]
    boxes = pd.DataFrame({"id": images["id"], "x_pos": 1, "y_pos": 2, "width": 10,
                          "height": 12,
                          "confidence": rng.uniform(size=m).round(4),
                          "label": [labels[i % 4] for i in range(m)]})
    boxes.to_csv(inp / "bboxes.adb.csv", index=False)
    same = boxes.head(1).loc[[0, 0, 0]].reset_index(drop=True)
    same["box_id"] = 123
    same["constraint_box_id"] = 123
    same.to_csv(inp / "bboxes-constraints.adb.csv", index=False)

    write_image_updates(inp, rng, image_files)

    dims = 16
    pd.DataFrame({"name": ["setA", "setB"], "dimensions": [dims, dims],
                  "engine": ["FaissFlat", "FaissFlat"], "metric": ["L2", "CS"]}).to_csv(
        inp / "descriptorset.adb.csv", index=False)
    for setname, count in (("setA", 120), ("setB", 80)):
        np.save(inp / f"{setname}_desc.npy", rng.uniform(size=(count, dims)).astype(np.float32))
        pd.DataFrame({"filename": f"{setname}_desc.npy", "index": range(count),
                      "set": setname, "id": range(count),
                      "label": [labels[i % 4] for i in range(count)],
                      "confidence": rng.uniform(size=count).round(4)}).to_csv(
            inp / f"{setname}.adb.csv", index=False)


def write_image_updates(inp: Path, rng: Any, small: list[str]) -> None:
    """Inputs of the image update loaders: the same ids loaded twice.

    ``updateif``: the second load's newer version updates the properties, never the
    blob (bigger images in ``fail_updates`` must not replace the small ones).
    ``forceupdate``: without a generated blob property the same holds
    (``fail_*``); with ``gen_blobsha1_sha`` a changed blob is deleted and added
    again (``blob_baseload`` then ``updates``: every image becomes big).
    ``mixednew``: the first load plus new ids. ``sparseload``: half, then all.
    """
    import cv2
    import numpy as np
    import pandas as pd

    big = []
    for i in range(20):
        name = f"images/big_{i:04d}.png"
        pixels = rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8)
        ok, png = cv2.imencode(".png", pixels)
        assert ok
        (inp / name).write_bytes(png.tobytes())
        big.append(name)

    def frame(files: list[str], ids: list[int], version: int, gen: bool = False) -> Any:
        df = pd.DataFrame({"filename": files, "id": ids, "license": [i % 3 for i in ids],
                           "version_id": version})
        if gen:
            df["gen_blobsha1_sha"] = ""  # the loader computes the blob's sha1
        df["constraint_id"] = df["id"]
        df["updateif_<version_id"] = version
        if gen:
            df["updateif_blobsha1_sha"] = ""
        return df

    base_ids = list(range(1000, 1020))
    new_ids = list(range(2000, 2010))
    smalls = [small[i % len(small)] for i in range(20)]
    for kind in ("updateif", "forceupdate"):
        frame(smalls, base_ids, 1).to_csv(inp / f"images_{kind}_baseload.adb.csv", index=False)
        pd.concat([frame(smalls, base_ids, 1), frame(smalls[:10], new_ids, 1)]).to_csv(
            inp / f"images_{kind}_mixednew.adb.csv", index=False)
    frame(smalls, base_ids, 1).to_csv(inp / "images_updateif_fail_baseload.adb.csv",
                                      index=False)
    frame(big, base_ids, 2).to_csv(inp / "images_updateif_fail_updates.adb.csv", index=False)
    frame(smalls, base_ids, 1).to_csv(inp / "images_forceupdate_fail_base.adb.csv",
                                      index=False)
    frame(big, base_ids, 2).to_csv(inp / "images_forceupdate_fail_updates.adb.csv",
                                   index=False)
    frame(smalls, base_ids, 1, gen=True).to_csv(
        inp / "images_forceupdate_blob_baseload.adb.csv", index=False)
    frame(big, base_ids, 2, gen=True).to_csv(inp / "images_forceupdate_updates.adb.csv",
                                             index=False)
    sparse = frame(smalls, base_ids, 1).drop(columns=["updateif_<version_id"])
    sparse.head(10).to_csv(inp / "images_sparseload_base.adb.csv", index=False)
    sparse.to_csv(inp / "images_sparseload_full.adb.csv", index=False)


def write_support(tests: Path) -> None:
    (tests / "conftest.py").write_text(_CONFTEST.format(skip_markers=SKIP_MARKERS))
    (tests / "dbinfo.py").write_text(_DBINFO)
    markers = "".join(f"    {name}: {why}\n" for name, why in SKIP_MARKERS.items())
    (tests / "pytest.ini").write_text(_PYTEST_INI.format(markers=markers.rstrip("\n")))


def run_module(tests: Path, module: str, timeout: float) -> dict:
    """One module against a fresh server; the counts and the skipped tests."""
    results = tests / f".{module}.results.jsonl"
    if results.exists():
        results.unlink()
    with ServerProcess(tls=True) as server:
        env = dict(os.environ, SDK_SUITE_PORT=str(server.port), SDK_SUITE_CA=server.ca_path or "",
                   ADB_LOG_FILE="", SDK_SUITE_RESULTS=str(results))
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "-p", "no:randomly", f"{module}.py"],
                cwd=tests, env=env, capture_output=True, text=True, timeout=timeout)
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            out = f"TIMEOUT after {timeout} s\n{e.stdout or ''}"
        elapsed = time.monotonic() - started
    counts = {"db": [0, 0, 0, 0], "other": [0, 0, 0, 0]}  # passed, failed, errors, skipped
    skipped: list[tuple[str, str]] = []
    failed: list[str] = []
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            outcome = OUTCOMES.index(r["outcome"])
            if r["outcome"] == "skipped":
                skipped.append((r["test"], r["why"]))
            elif r["outcome"] != "passed":
                failed.append(f"{r['outcome'].upper()} {r['test']}")
            counts["db" if r["db"] else "other"][outcome] += 1
    return {"counts": counts, "skipped": skipped, "failed": failed, "elapsed": elapsed,
            "output": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default="0.5.3", help="the SDK version whose suite to run")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "adb-sdk-suite"),
                    help="where the sdist is downloaded and unpacked (reused)")
    ap.add_argument("--module", action="append", default=[],
                    help="run only this module (repeatable), e.g. test_Utils")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per module")
    ap.add_argument("--verbose", action="store_true", help="print each failing test's output")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tests = fetch_tests(args.version, workdir)
    write_support(tests)
    write_inputs(tests)
    modules = sorted(p.stem for p in tests.glob("test_*.py"))
    if args.module:
        unknown = sorted(set(args.module) - set(modules))
        if unknown:
            raise SystemExit(f"no such module in the suite: {', '.join(unknown)}")
        modules = [m for m in modules if m in args.module]

    total = {"db": [0, 0, 0, 0], "other": [0, 0, 0, 0]}
    all_skipped: list[tuple[str, str]] = []
    print(f"SDK {args.version} suite against aperturedb-pool serve --tls "
          "(passed/failed/errors/skipped; db = tests with the db fixture)")
    for module in modules:
        if module in NOT_RUN:
            print(f"{module:28s} not run: {NOT_RUN[module]}")
            continue
        r = run_module(tests, module, args.timeout)
        d, o = r["counts"]["db"], r["counts"]["other"]
        for g in ("db", "other"):
            total[g] = [a + b for a, b in zip(total[g], r["counts"][g], strict=True)]
        all_skipped += r["skipped"]
        print(f"{module:28s} db {d[0]:3d}/{d[1]:3d}/{d[2]:3d}/{d[3]:3d}   "
              f"other {o[0]:3d}/{o[1]:3d}/{o[2]:3d}/{o[3]:3d}   {r['elapsed']:6.1f} s")
        for name in r["failed"]:
            print(f"    {name}")
        if args.verbose and r["failed"]:
            print(r["output"][-6000:])
    d, o = total["db"], total["other"]
    print(f"TOTAL db tests: {d[0]} passed, {d[1]} failed, {d[2]} errors, {d[3]} skipped; "
          f"other tests: {o[0]} passed, {o[1]} failed, {o[2]} errors, {o[3]} skipped")
    if all_skipped:
        print("skipped:")
        for name, why in all_skipped:
            print(f"    {name}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
