"""No record of any weight file runs pickled code (convert/safe_pickle.py).

Each test plants a payload that would create a marker file if executed, in
one record the readers parse: the four legacy torch header records, the
state-dict record of both torch formats, a persistent id, a detectron2
``.pkl``, and an ``.npz`` for ``config.init``.
"""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from boxseg_jax.convert import dino
from boxseg_jax.convert import safe_pickle
from boxseg_jax.train import checkpoint as ckpt_lib

_MAGIC = 0x1950a86a20f9469cfc6c
_MARKER = "SHOULD_NOT_EXIST"


class _Evil:

  def __reduce__(self):
    return (os.system, (f"touch {_MARKER}",))


def _legacy_records(payload_at):
  """The five legacy records with ``_Evil`` planted in record ``payload_at``."""
  records = [_MAGIC, 1001, {"little_endian": True, "type_sizes": {}},
             {"w": 1}, []]
  if payload_at == 2:
    records[2] = {"little_endian": True, "hook": _Evil()}
  elif payload_at == 4:
    records[4] = [_Evil()]
  elif payload_at is not None:
    records[payload_at] = _Evil()
  buf = io.BytesIO()
  for r in records:
    pickle.dump(r, buf, protocol=2)
  return buf.getvalue()


@pytest.mark.parametrize("record,name", [(0, "magic"), (1, "protocol"),
                                         (2, "sys_info"), (4, "storage keys")])
def test_legacy_header_payload_is_refused(tmp_path, monkeypatch, record,
                                          name):
  del name
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "evil.pth"
  path.write_bytes(_legacy_records(record))
  with pytest.raises(safe_pickle.UnsafePickleError, match="os.system|posix"):
    safe_pickle.read_torch_checkpoint(str(path))
  with pytest.raises(safe_pickle.UnsafePickleError):
    dino.load_dino(str(path))
  assert not (tmp_path / _MARKER).exists()


def test_legacy_state_dict_payload_is_inert(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "evil.pth"
  path.write_bytes(_legacy_records(3))
  got = safe_pickle.read_torch_checkpoint(str(path))
  assert isinstance(got, safe_pickle.Opaque)
  assert not (tmp_path / _MARKER).exists()


def test_clean_legacy_file_reads(tmp_path):
  path = tmp_path / "ok.pth"
  path.write_bytes(_legacy_records(None))
  assert safe_pickle.read_torch_checkpoint(str(path)) == {"w": 1}


def test_zip_state_dict_payload_is_inert(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  buf = io.BytesIO()
  pickle.dump({"payload": _Evil(), "n": 3}, buf, protocol=2)
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
  got = safe_pickle.read_torch_checkpoint(str(path))
  assert isinstance(got["payload"], safe_pickle.Opaque)
  assert got["n"] == 3
  assert not (tmp_path / _MARKER).exists()


class _EvilPid:
  """An object pickled as a persistent id holding a payload."""


def test_persistent_id_payload_is_inert(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.persistent_id = lambda obj: (
      ("storage", _Evil(), "0", "cpu", 1) if isinstance(obj, _EvilPid)
      else None)
  pickler.dump({"w": _EvilPid()})
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
  with pytest.raises(safe_pickle.CheckpointError, match="storage type"):
    safe_pickle.read_torch_checkpoint(str(path))
  assert not (tmp_path / _MARKER).exists()


def test_plain_records_take_no_persistent_ids(tmp_path):
  buf = io.BytesIO()
  pickler = pickle.Pickler(buf, protocol=2)
  pickler.persistent_id = lambda obj: "x" if obj == "pid" else None
  pickler.dump(["pid"])
  buf.seek(0)
  with pytest.raises(safe_pickle.UnsafePickleError, match="persistent"):
    safe_pickle.load_record(buf, str(tmp_path / "f"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickle_roundtrip(tmp_path, protocol):
  rng = np.random.default_rng(0)
  blobs = {"conv1_w": rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
           "res_conv1_bn_s": rng.standard_normal(4).astype(np.float32),
           "fortran": np.asfortranarray(
               rng.standard_normal((3, 5)).astype(np.float64)),
           "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
           "scalar": np.float32(2.5)}
  path = tmp_path / "R-50.pkl"
  path.write_bytes(pickle.dumps({"blobs": blobs, "__author__": "x"},
                                protocol=protocol))
  got = safe_pickle.read_numpy_pickle(str(path))
  assert got["__author__"] == "x"
  for k, v in blobs.items():
    np.testing.assert_array_equal(got["blobs"][k], v)
    assert np.asarray(got["blobs"][k]).dtype == np.asarray(v).dtype


class _Py2Array:
  """Pickles like a Python-2 numpy array: raw bytes as a latin-1 str."""

  def __init__(self, arr):
    self.arr = arr

  def __reduce__(self):
    state = (1, self.arr.shape, self.arr.dtype, False,
             self.arr.tobytes().decode("latin1"))
    return (np.core.multiarray._reconstruct,  # pylint: disable=W0212
            (np.ndarray, (0,), b"b"), state)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_numpy_pickle_python2_strings(tmp_path):
  arr = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
  path = tmp_path / "msra.pkl"
  path.write_bytes(pickle.dumps({"w": _Py2Array(arr)}, protocol=2))
  np.testing.assert_array_equal(
      safe_pickle.read_numpy_pickle(str(path))["w"], arr)


def test_numpy_pickle_payload_and_object_arrays_refused(tmp_path,
                                                        monkeypatch):
  monkeypatch.chdir(tmp_path)
  evil = tmp_path / "evil.pkl"
  evil.write_bytes(pickle.dumps({"blobs": {"w": _Evil()}}, protocol=2))
  with pytest.raises(safe_pickle.UnsafePickleError, match="evil.pkl"):
    safe_pickle.read_numpy_pickle(str(evil))
  objs = tmp_path / "objects.pkl"
  objs.write_bytes(pickle.dumps(
      {"w": np.array([_Evil(), 1], dtype=object)}, protocol=2))
  with pytest.raises(safe_pickle.UnsafePickleError):
    safe_pickle.read_numpy_pickle(str(objs))
  assert not (tmp_path / _MARKER).exists()


def test_npz_object_array_refused_for_config_init(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = tmp_path / "init.npz"
  np.savez(path, **{"backbone/w": np.array([_Evil()], dtype=object)})
  with pytest.raises(safe_pickle.UnsafePickleError,
                     match=r"config\.init=.*init\.npz.*object array"):
    ckpt_lib.load_params_for_init(str(path))
  assert not (tmp_path / _MARKER).exists()
  good = tmp_path / "good.npz"
  np.savez(good, **{"backbone/w": np.ones((2,), np.float32)})
  loaded = ckpt_lib.load_params_for_init(str(good))
  np.testing.assert_array_equal(loaded["backbone"]["w"], np.ones(2))
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"nope")
  with pytest.raises(safe_pickle.CheckpointError, match="config.init"):
    ckpt_lib.load_params_for_init(str(junk))
