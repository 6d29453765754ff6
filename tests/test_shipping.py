"""Job inputs and outputs as bytes for workers on other machines (bot/engine/backends/shipping.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bot.engine.backends.shipping import InputCache, Packer, read_blob, unpack_params, write_tree


def test_inputs_become_content_addresses_and_outputs_placeholders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lora = data / "users" / "u:1" / "lora"
    lora.mkdir(parents=True)
    (lora / "w.safetensors").write_bytes(b"weights")
    selfie = data / "users" / "u:1" / "s.jpg"
    selfie.write_bytes(b"jpeg")
    twin = data / "users" / "u:2" / "same.jpg"
    twin.parent.mkdir()
    twin.write_bytes(b"jpeg")  # the same bytes under another name: kept apart (a node keeps names)
    out = data / "users" / "u:1" / "identity.npz"
    packer = Packer(data)
    params = {"user_lora": str(lora), "selfies": [{"path": str(selfie)}, {"path": str(twin)}], "out": str(out),
              "style": "/app/styles/x.toml", "out_dir": str(data / "users" / "u:1" / "jobs" / "3"), "count": 2}
    packed, found, outputs = packer.pack_params(params)
    assert packed["style"] == "/app/styles/x.toml" and packed["out_dir"] == params["out_dir"] and packed["count"] == 2
    assert packer.digest(selfie) == Packer(data).digest(selfie) != packer.digest(twin)
    assert len(found) == 3 and list(outputs.values()) == [out]
    cache = InputCache(tmp_path / "node", budget_bytes=1 << 20)
    assert sorted(cache.missing(list(found))) == sorted(found)
    for digest, path in found.items():
        cache.put(digest, read_blob(path))
    assert cache.missing(list(found)) == []
    job_dir = tmp_path / "node-job"
    unpacked, used = unpack_params(packed, cache, job_dir)
    assert Path(unpacked["user_lora"], "w.safetensors").read_bytes() == b"weights"
    assert [Path(s["path"]).read_bytes() for s in unpacked["selfies"]] == [b"jpeg", b"jpeg"]
    assert Path(unpacked["out"]).parent == job_dir / ".outputs" and used == set(found)
    assert not any(str(data) in str(v) for v in (unpacked["user_lora"], unpacked["selfies"], unpacked["out"]))


def test_the_node_cache_evicts_least_recently_used_but_not_what_runs(tmp_path: Path) -> None:
    cache = InputCache(tmp_path, budget_bytes=10)
    for name in ("a", "b", "c"):
        cache.put(name, {"f": b"12345"})
        cache.path(name, "f")
    cache.path("a", "f")  # used again: now the most recent
    assert cache.evict(keep={"b"}) == ["c"]
    assert cache.digests() == ["b", "a"] and not (tmp_path / "c").exists()
    assert InputCache(tmp_path, budget_bytes=10).missing(["a", "b", "c"]) == ["c"]  # found again after a restart


def test_files_coming_back_cannot_escape_their_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_tree(tmp_path / "job", {"../../etc/x": b"no"})
    assert write_tree(tmp_path / "job", {"checkpoint/step.txt": b"5"}) == [(tmp_path / "job/checkpoint/step.txt").resolve()]
