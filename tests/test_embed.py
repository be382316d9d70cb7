from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO_ROOT, make_shards, run_two_gloo_processes, shape_png
from PIL import Image

import clipcid.embed.run as embed_module
from clipcid.embed import EmbedConfig, embed
from clipcid.errors import ClipcidError
from clipcid.inputs.shards import iter_tar_samples, write_tar_atomic


def _load(root: Path, i: int):
    img = np.load(root / "img_emb" / f"img_emb_{i}.npy")
    txt = np.load(root / "text_emb" / f"text_emb_{i}.npy")
    meta = pq.read_table(root / "metadata" / f"metadata_{i}.parquet").to_pydict()
    return img, txt, meta


def _embed_args(data, out, ckpt, batch_size: int) -> list[str]:
    """`clipcid embed` arguments for the tiny checkpoint, data loading in the main process."""
    return [
        "embed",
        "--data",
        str(data),
        "--model",
        "clipcid-tiny",
        "--pretrained",
        str(ckpt),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        "--workers",
        "0",
    ]


def _cfg(data, out, ckpt, **kw) -> EmbedConfig:
    return EmbedConfig(
        data=str(data),
        model="clipcid-tiny",
        out=str(out),
        pretrained=str(ckpt),
        batch_size=kw.pop("batch_size", 4),
        workers=kw.pop("workers", 0),
        **kw,
    )


def test_rows_keys_norms_dtype(shards, tmp_path, tiny_checkpoint):
    folder, keys = shards
    out = tmp_path / "emb"
    summary = embed(_cfg(folder, out, tiny_checkpoint, workers=2))
    assert summary["parts"] == 3 and summary["rows"] == 30 and summary["invalid"] == 0
    assert summary["dim"] == 256
    for i in range(3):
        img, txt, meta = _load(out, i)
        assert img.dtype == np.float16 and txt.dtype == np.float16
        assert img.shape == txt.shape == (10, 256)
        assert meta["key"] == keys[i]
        assert meta["row"] == list(range(10))
        assert set(meta["shard"]) == {f"{i:05d}.tar"}
        assert all(meta["valid"])
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(txt.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_embeddings_equal_direct_encode(shards, tmp_path, tiny_checkpoint):
    """Row j of part i is the teacher's embedding of sample j of shard i (nothing shuffled)."""
    folder, _ = shards
    out = tmp_path / "emb"
    embed(_cfg(folder, out, tiny_checkpoint, batch_size=3))
    model, _, preprocess = open_clip.create_model_and_transforms("clipcid-tiny", pretrained=str(tiny_checkpoint))
    tokenizer = open_clip.get_tokenizer("clipcid-tiny")
    model.eval()
    samples = list(iter_tar_samples(folder / "00001.tar"))
    images = torch.stack([preprocess(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples])
    with torch.no_grad():
        want_img = F.normalize(model.encode_image(images), dim=-1).numpy()
        want_txt = F.normalize(model.encode_text(tokenizer([s["txt"].decode() for s in samples])), dim=-1).numpy()
    img, txt, meta = _load(out, 1)
    assert meta["caption"] == [s["txt"].decode() for s in samples]
    np.testing.assert_allclose(img.astype(np.float32), want_img, atol=2e-3)
    np.testing.assert_allclose(txt.astype(np.float32), want_txt, atol=2e-3)


def test_corrupt_image_and_missing_caption_are_marked_not_shifted(tmp_path, tiny_checkpoint):
    folder = tmp_path / "shards"
    samples = [
        {"__key__": "000000000", "png": shape_png("red", "circle"), "txt": "a red circle"},
        {"__key__": "000000001", "png": b"\x89PNG\r\n\x1a\nnot really a png", "txt": "broken"},
        {"__key__": "000000002", "png": shape_png("blue", "square"), "txt": "a blue square"},
        {"__key__": "000000003", "png": shape_png("green", "cross")},  # no caption
        {"__key__": "000000004", "txt": "no image at all"},
        {"__key__": "000000005", "png": shape_png("black", "triangle"), "txt": "a black triangle"},
    ]
    write_tar_atomic(folder / "00000.tar", samples)
    out = tmp_path / "emb"
    summary = embed(_cfg(folder, out, tiny_checkpoint, batch_size=4))
    assert summary["rows"] == 6 and summary["invalid"] == 3
    img, txt, meta = _load(out, 0)
    assert meta["key"] == [s["__key__"] for s in samples]
    assert meta["valid"] == [True, False, True, False, False, True]
    assert meta["error"][1].startswith("undecodable image")
    assert meta["error"][3] == "no caption" and meta["error"][4] == "no image"
    assert not img[[1, 3, 4]].any() and not txt[[1, 3, 4]].any()
    # The valid rows hold the same vectors as a shard without the bad samples.
    clean = tmp_path / "clean"
    write_tar_atomic(clean / "00000.tar", [samples[i] for i in (0, 2, 5)])
    embed(_cfg(clean, tmp_path / "emb_clean", tiny_checkpoint, batch_size=4))
    clean_img, _, _ = _load(tmp_path / "emb_clean", 0)
    np.testing.assert_allclose(img[[0, 2, 5]].astype(np.float32), clean_img.astype(np.float32), atol=2e-3)


def test_resume_after_crash_skips_finished_parts(shards, tmp_path, tiny_checkpoint, monkeypatch):
    folder, _ = shards
    reference = tmp_path / "reference"
    embed(_cfg(folder, reference, tiny_checkpoint))

    out = tmp_path / "emb"
    real_write = embed_module._write_part
    calls = []

    def crash_on_second_part(root, index, *rest):
        calls.append(index)
        if len(calls) == 2:
            # Leave a half-written temporary behind, as a killed process would.
            (root / "img_emb" / f"img_emb_{index}.npy.999.tmp").write_bytes(b"partial")
            raise RuntimeError("simulated crash")
        return real_write(root, index, *rest)

    monkeypatch.setattr(embed_module, "_write_part", crash_on_second_part)
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed(_cfg(folder, out, tiny_checkpoint))
    done_before = sorted(p.name for p in (out / "metadata").glob("*.parquet"))
    assert done_before == ["metadata_0.parquet"]
    first_mtime = (out / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns

    monkeypatch.setattr(embed_module, "_write_part", real_write)
    calls.clear()
    summary = embed(_cfg(folder, out, tiny_checkpoint))
    assert summary["rows"] == 30
    assert (out / "img_emb" / "img_emb_0.npy").stat().st_mtime_ns == first_mtime  # not recomputed
    assert not list(out.rglob("*.tmp"))
    for i in range(3):
        for got, want in zip(_load(out, i)[:2], _load(reference, i)[:2], strict=True):
            np.testing.assert_array_equal(got, want)
        assert _load(out, i)[2]["key"] == _load(reference, i)[2]["key"]


def test_killed_process_resumes_without_losing_or_duplicating_rows(tmp_path, tiny_checkpoint):
    folder = tmp_path / "shards"
    keys = make_shards(folder, n_shards=6, per_shard=24)
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "clipcid", *_embed_args(folder, out, tiny_checkpoint, batch_size=2)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "metadata" / "metadata_0.parquet").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True)
    total = 0
    for i in range(6):
        _, _, meta = _load(out, i)
        assert meta["key"] == keys[i]
        total += len(meta["key"])
    assert total == 6 * 24


def test_table_inputs(tmp_path, tiny_checkpoint):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "cross")] * 3):
        (images / f"{i}.png").write_bytes(shape_png(colour, shape))
        rows.append({"filepath": f"images/{i}.png", "title": f"a {colour} {shape}"})
    rows.append({"filepath": "images/missing.png", "title": "gone"})
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title\n" + "".join(f"{r['filepath']},{r['title']}\n" for r in rows))
    summary = embed(_cfg(csv, tmp_path / "emb_csv", tiny_checkpoint, rows_per_part=4))
    assert summary["parts"] == 3 and summary["rows"] == 10 and summary["invalid"] == 1
    _, _, last = _load(tmp_path / "emb_csv", 2)
    assert last["valid"] == [True, False] and last["caption"] == ["a green cross", "gone"]

    # img2dataset parquet output (bytes inside) and `files` output give the same vectors as the CSV.
    pq_dir = tmp_path / "i2d_parquet"
    pq_dir.mkdir()
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(9)],
            "jpg": [(images / f"{i}.png").read_bytes() for i in range(9)],
            "caption": [r["title"] for r in rows[:9]],
        }
    )
    pq.write_table(table, pq_dir / "00000.parquet")
    embed(_cfg(pq_dir, tmp_path / "emb_pq", tiny_checkpoint))
    files_dir = tmp_path / "i2d_files" / "00000"
    files_dir.mkdir(parents=True)
    for i in range(9):
        shutil.copy(images / f"{i}.png", files_dir / f"{i:09d}.png")
        (files_dir / f"{i:09d}.txt").write_text(rows[i]["title"])
    embed(_cfg(tmp_path / "i2d_files", tmp_path / "emb_files", tiny_checkpoint))
    csv_img = np.concatenate([_load(tmp_path / "emb_csv", i)[0] for i in range(3)])[:9]
    np.testing.assert_array_equal(_load(tmp_path / "emb_pq", 0)[0], csv_img)
    np.testing.assert_array_equal(_load(tmp_path / "emb_files", 0)[0], csv_img)
    assert _load(tmp_path / "emb_files", 0)[2]["key"] == [f"{i:09d}" for i in range(9)]


def test_refuses_to_mix_models_in_one_folder(shards, tmp_path, tiny_checkpoint):
    folder, _ = shards
    out = tmp_path / "emb"
    embed(_cfg(folder, out, tiny_checkpoint))
    with pytest.raises(ClipcidError, match="other settings"):
        embed(EmbedConfig(data=str(folder), model="clipcid-small", out=str(out), workers=0))


def test_two_gloo_processes_equal_one(shards, tmp_path, tiny_checkpoint):
    folder, _ = shards
    single = tmp_path / "single"
    embed(_cfg(folder, single, tiny_checkpoint))
    double = tmp_path / "double"
    run_two_gloo_processes(
        ["-m", "clipcid", *_embed_args(folder, double, tiny_checkpoint, batch_size=4), "--device", "cpu"]
    )
    for i in range(3):
        for got, want in zip(_load(double, i), _load(single, i), strict=True):
            if isinstance(got, np.ndarray):
                np.testing.assert_array_equal(got, want)
            else:
                assert got == want


def test_parts_are_named_and_described_as_clip_retrieval_writes_them(tmp_path, tiny_checkpoint):
    from clipcid.embed.artifact import Embeddings

    for s in range(12):  # 12 parts: clip-retrieval pads their numbers to two digits
        samples = [
            {
                "__key__": f"{s:05d}{r:04d}",
                "png": shape_png("red", "circle"),
                "txt": f"a red circle {r}",
                "json": {"url": f"https://example.org/{s}/{r}.png", "key": f"{s:05d}{r:04d}"},
            }
            for r in range(2)
        ]
        write_tar_atomic(tmp_path / "shards" / f"{s:05d}.tar", samples)
    embed(_cfg(tmp_path / "shards", tmp_path / "emb", tiny_checkpoint))
    names = sorted(p.name for p in (tmp_path / "emb" / "img_emb").iterdir())
    assert names == [f"img_emb_{i:02d}.npy" for i in range(12)]
    assert sorted(p.name for p in (tmp_path / "emb" / "metadata").iterdir())[:2] == [
        "metadata_00.parquet",
        "metadata_01.parquet",
    ]
    meta = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_11.parquet")
    assert meta.column_names[:4] == ["image_path", "caption", "key", "url"]
    assert meta.column("url").to_pylist() == ["https://example.org/11/0.png", "https://example.org/11/1.png"]
    assert meta.column("image_path").to_pylist() == meta.column("key").to_pylist()  # webdataset: the key
    # Readers take clip-retrieval's padded names and plain ones alike, in part order.
    plain = tmp_path / "plain"
    shutil.copytree(tmp_path / "emb", plain)
    for f in list(plain.rglob("*_[0-9][0-9].*")):
        stem, number = f.stem.rsplit("_", 1)
        f.rename(f.with_name(f"{stem}_{int(number)}{f.suffix}"))
    a, b = Embeddings.open(tmp_path / "emb"), Embeddings.open(plain)
    assert a.part_ids == b.part_ids == list(range(12))
    for i in (2, 10, 11):
        np.testing.assert_array_equal(a.images.part(i), b.images.part(i))
        assert a.keys(i).to_pylist() == b.keys(i).to_pylist() == [f"{i:05d}0000", f"{i:05d}0001"]


def test_validity_is_decided_when_a_part_is_written_and_read_without_the_vectors(tmp_path, monkeypatch):
    import pyarrow as pa

    from clipcid.embed.artifact import NON_FINITE, VALIDITY, Embeddings, EmbeddingStore, write_part
    from clipcid.stage import RunFolder

    img = np.ones((6, 4), np.float16)
    txt = np.ones((6, 4), np.float16)
    img[1, 2], txt[4, 0] = np.nan, np.inf
    meta = {"key": pa.array([str(r) for r in range(6)]), "valid": pa.array([True, True, True, False, True, True])}
    with RunFolder(tmp_path, "embed.json", {"parts": 1}) as folder:
        write_part(tmp_path, 0, 1, img, txt, meta)
        folder.finish({"validity": VALIDITY})
    emb = Embeddings.open(tmp_path)
    written = emb.metadata(0, ["valid", "error"]).to_pydict()
    assert written["valid"] == [True, False, True, False, False, True]
    assert written["error"] == [None, NON_FINITE, None, None, NON_FINITE, None]
    assert np.isfinite(np.load(tmp_path / "img_emb" / "img_emb_0.npy")).all()  # zeroed, as invalid rows are

    def no_vector_reads(self, i):
        raise AssertionError("validity was read from the vectors")

    monkeypatch.setattr(EmbeddingStore, "part", no_vector_reads)
    assert emb.validity_decided and emb.valid(0).tolist() == written["valid"]
    assert emb.non_finite_rows() == 2


def test_a_vector_that_turned_non_finite_after_embed_is_refused_where_it_is_read(tmp_path, capsys):
    """Validity is stored, never trusted blindly: rows embed recorded valid that are not finite now (the
    file changed since) stop the stage that reads them, naming the part, instead of being trained on."""
    import pyarrow as pa

    from clipcid.cli import main
    from clipcid.embed.artifact import VALIDITY, Embeddings, write_part
    from clipcid.stage import RunFolder

    rng = np.random.default_rng(0)
    emb_dir = tmp_path / "emb"
    with RunFolder(emb_dir, "embed.json", {"parts": 2}) as folder:
        for i in range(2):
            vectors = rng.normal(size=(20, 8)).astype(np.float16)
            meta = {"key": pa.array([f"{i}-{r}" for r in range(20)]), "valid": pa.array([r != 5 for r in range(20)])}
            write_part(emb_dir, i, 2, vectors, vectors.copy(), meta)
        folder.finish({"validity": VALIDITY})
    out = tmp_path / "balance"
    assert main(["balance", "--emb", str(emb_dir), "--out", str(out), "--threshold", "0.5"]) == 0
    part = np.load(emb_dir / "img_emb" / "img_emb_1.npy", mmap_mode="r+")
    part[[2, 7, 11]] = np.nan  # three rows of one image part, written over after embed
    part.flush()
    del part
    store = Embeddings.open(emb_dir).images
    assert store.read(0).shape == (20, 8) and np.isfinite(store.read(1, np.array([0, 1, 3]))).all()
    for read in (lambda: store.read(1), lambda: store.rows(np.array([3, 27])),
                 lambda: store.pairs(np.array([0, 1]), np.array([4, 11]))):  # fmt: skip
        with pytest.raises(ClipcidError, match=r"img_emb_1\.npy: .* recorded valid are not finite .* changed after"):
            read()
    assert main(["balance", "--emb", str(emb_dir), "--out", str(tmp_path / "again"), "--threshold", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img_emb_1.npy: 3 row(s) that embed recorded valid are not finite (row 2 first)" in err[0]
