"""MPS data-set compression (mpokit.data.mps, mpokit.ops.mps) and `mpokit data`: numerics, bytes, files, CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mpokit.cli.main import main
from mpokit.data.mps import CompressedSet, MPSDataset, compress_dataset, read_array
from mpokit.ops.mps import image_layout, mps_svd, mps_to_vector


def smooth_images(n: int = 24, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Blurry random images (N, 1, h, w): low-rank-ish but not exactly, like digits."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, h + 2, w + 2, generator=g, dtype=torch.float64)
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1)  # (N, 1, h, w)
    return x


def rel(x, y):
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return torch.linalg.vector_norm(x - y, dim=1) / torch.linalg.vector_norm(x, dim=1)


# ---- layout --------------------------------------------------------------------------------------
def test_interleaved_layout_of_8x8_digits():
    lay = image_layout((8, 8))
    assert lay.sites == (2, 2, 2, 2, 2, 2)
    img = torch.arange(64.0).reshape(1, 8, 8)
    v = lay.to_sites(img).reshape(2, 2, 2, 2, 2, 2)  # (r1, c1, r2, c2, r3, c3)
    for r1, c1, r2, c2, r3, c3 in np.ndindex(2, 2, 2, 2, 2, 2):
        assert v[r1, c1, r2, c2, r3, c3] == img[0, 4 * r1 + 2 * r2 + r3, 4 * c1 + 2 * c2 + c3]
    assert torch.equal(lay.from_sites(lay.to_sites(img)), img)
    raster = image_layout((8, 8), "raster")
    assert torch.equal(raster.to_sites(img), img.reshape(1, -1))  # negative control: raster is not interleaved
    assert not torch.equal(lay.to_sites(img), img.reshape(1, -1))


def test_layout_from_dict_rejects_inconsistent():
    good = image_layout((8, 8)).to_dict()
    assert image_layout((8, 8)) == type(image_layout((8, 8))).from_dict(good)
    with pytest.raises(ValueError, match="consistent MPS layout"):
        type(image_layout((8, 8))).from_dict({**good, "sites": [4, 4, 4]})


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 4), (12,), (28, 28), (7,), (5, 9)])
def test_layout_round_trip(shape):
    lay = image_layout(shape)
    x = torch.randn(3, *shape)
    assert torch.equal(lay.from_sites(lay.to_sites(x)), x)
    assert int(np.prod(lay.sites)) == int(np.prod(shape))


# ---- numerics ------------------------------------------------------------------------------------
def test_ops_mps_exact_at_full_bond_float64():
    v = torch.randn(2 * 3 * 2 * 5, dtype=torch.float64)
    cores, info = mps_svd(v, [2, 3, 2, 5])
    assert [c.shape[0] for c in cores[1:]] == info.bonds == [2, 6, 5]
    assert torch.linalg.vector_norm(mps_to_vector(cores) - v) / torch.linalg.vector_norm(v) < 1e-12


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float64", 1e-12)])
def test_exact_reconstruction_at_full_bond(dtype, tol):
    x = smooth_images()
    c = compress_dataset(x, bytes_per_sample=10**6, dtype=dtype)
    assert c.bonds.tolist() == [[2, 4, 8, 4, 2]] * len(x)  # full bonds of six dimension-2 sites
    assert rel(x, c.decompress_batch()).max() < tol
    assert c.errors.max() < tol


def test_error_bound_respected_and_truncated_differs():
    x = smooth_images(n=30)
    for dtype in ("float16", "float32"):
        c = compress_dataset(x, max_error=0.05, dtype=dtype)
        errors = rel(x, c.decompress_batch())
        assert errors.max() <= 0.05 + 1e-6, errors.max()
        assert errors.max() > 1e-3  # negative control: it truncated, it did not keep everything
        assert (c.bonds < torch.tensor([2, 4, 8, 4, 2])).any()
        assert not torch.allclose(c.decompress_batch().double(), x, atol=1e-4)
    tighter = compress_dataset(x, max_error=0.01, dtype="float32")
    assert tighter.nbytes > compress_dataset(x, max_error=0.05, dtype="float32").nbytes


def test_error_bound_below_float16_floor_is_refused():
    with pytest.raises(ValueError, match="rounding floor"):
        compress_dataset(smooth_images(n=3), max_error=1e-7, dtype="float16")


def test_byte_budgets_respected_and_counted_honestly():
    x = smooth_images(n=40)
    c = compress_dataset(x, bytes_per_sample=64)
    assert all(c.sample_bytes(i) <= 64 for i in range(len(c)))
    assert c.nbytes == c.cores.numel() * 2 + len(c) * 5  # float16 cores + one uint8 per bond
    assert c.nbytes == sum(c.sample_bytes(i) for i in range(len(c)))
    total = compress_dataset(x, total_bytes=40 * 50)
    assert total.nbytes <= 40 * 50
    assert total.nbytes > 40 * 50 * 0.8  # it spends the budget
    assert (rel(x, c.decompress_batch()) > 0.01).all()  # negative control: 64 bytes cannot hold 8x8 floats exactly
    with pytest.raises(ValueError, match="bytes_per_sample >= 29"):
        compress_dataset(x, bytes_per_sample=20)
    with pytest.raises(ValueError, match="exactly one"):
        compress_dataset(x, bytes_per_sample=64, max_error=0.1)


def test_budget_planner_beats_uniform_budget_on_mixed_data():
    """Half the images blank-ish (rank 1), half noisy: the planner gives the noisy ones the bytes."""
    g = torch.Generator().manual_seed(1)
    easy = torch.ones(10, 8, 8, dtype=torch.float64) * torch.rand(10, 1, 1, generator=g, dtype=torch.float64)
    hard = torch.rand(10, 8, 8, generator=g, dtype=torch.float64)
    x = torch.cat([easy, hard])
    uniform = compress_dataset(x, bytes_per_sample=80, dtype="float32")
    planned = compress_dataset(x, total_bytes=uniform.nbytes, dtype="float32")
    err = lambda c: torch.linalg.vector_norm(c.decompress_batch().double() - x).item()  # noqa: E731
    assert planned.nbytes <= uniform.nbytes and err(planned) < err(uniform)


def test_decompress_batch_equals_per_sample_and_ops_contraction():
    x = smooth_images(n=12)
    c = compress_dataset(x, total_bytes=12 * 70, dtype="float32")
    assert len(set(map(tuple, c.bonds.tolist()))) > 1  # different bonds in one batch: the padding path
    batch = c.decompress_batch([3, 0, 7])
    for row, i in zip(batch, [3, 0, 7]):
        assert torch.allclose(row, c.decompress(i), atol=1e-6)
        direct = mps_to_vector([k.double() for k in c.cores_of(i)])
        assert torch.allclose(c.layout.to_sites(row[None])[0].double(), direct, atol=1e-6)
    assert c.decompress(0).shape == (1, 8, 8)


def test_dataset_wrapper_decompresses_on_the_fly():
    x, y = smooth_images(n=10), torch.arange(10) % 3
    c = compress_dataset(x, bytes_per_sample=64, labels=y)
    ds = MPSDataset(c)
    assert len(ds) == 10
    xi, yi = ds[4]
    assert torch.allclose(xi, c.decompress(4)) and yi == y[4]
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert torch.allclose(xb, c.decompress_batch(range(4)), atol=1e-6) and torch.equal(yb, y[:4])
    plain = MPSDataset(compress_dataset(x, bytes_per_sample=64), transform=lambda t: t * 2)
    assert torch.allclose(plain[1], 2 * c.decompress(1))


def test_save_load_bit_exact_and_refuses_existing(tmp_path):
    x, y = smooth_images(n=9), torch.arange(9)
    c = compress_dataset(x, max_error=0.1, labels=y)
    path = tmp_path / "set.safetensors"
    c.save(path)
    d = CompressedSet.load(path)
    for a, b in ((c.cores, d.cores), (c.bonds, d.bonds), (c.labels, d.labels), (c.errors, d.errors)):
        assert torch.equal(a, b)
    assert d.cores.dtype == torch.float16 and d.layout == c.layout
    assert torch.equal(c.decompress_batch(), d.decompress_batch())
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        compress_dataset(x, bytes_per_sample=40).save(path)
    assert path.read_bytes() == before
    compress_dataset(x, bytes_per_sample=40).save(path, overwrite=True)
    assert CompressedSet.load(path).nbytes < d.nbytes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="expected an mpokit MPS data set file"):
        CompressedSet.load(tmp_path / "junk.safetensors")


def test_read_array_formats(tmp_path):
    x = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", images=x, labels=np.arange(4))
    for name in ("a.npy", "b.npz"):
        got, labels = read_array(str(tmp_path / name))
        assert torch.equal(got, torch.from_numpy(x))
    assert labels.tolist() == [0, 1, 2, 3]
    digits, target = read_array("digits")
    assert digits.shape == (1797, 8, 8) and target.shape == (1797,)


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_round_trip(tmp_path, capsys):
    x = smooth_images(n=15)[:, 0].float().numpy()  # (15, 8, 8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(15))
    out = tmp_path / "set.safetensors"
    assert main(["data", "compress", str(tmp_path / "in.npz"), "--out", str(out), "--max-error", "0.08",
                 "--dtype", "float32", "--json", str(tmp_path / "s.json")]) == 0
    assert "ratio vs float32" in capsys.readouterr().out
    assert main(["data", "decompress", str(out), "--out", str(tmp_path / "back.npz")]) == 0
    with np.load(tmp_path / "back.npz") as z:
        back, labels = z["x"], z["y"]
    assert back.shape == x.shape and labels.tolist() == list(range(15))
    assert rel(torch.from_numpy(x), torch.from_numpy(back)).max() <= 0.08 + 1e-6
    assert main(["data", "decompress", str(out), "--out", str(tmp_path / "back.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "back.npy"), back)


def test_cli_digits_by_name(tmp_path, capsys):
    out = tmp_path / "digits.safetensors"
    assert main(["data", "compress", "digits", "--out", str(out), "--bytes-per-sample", "64", "--no-progress"]) == 0
    c = CompressedSet.load(out)
    assert len(c) == 1797 and c.nbytes <= 1797 * 64 and c.labels is not None


@pytest.mark.parametrize("argv, message", [
    (["compress", "{root}/missing.npy", "--out", "{root}/o.safetensors", "--max-error", "0.1"], "missing input"),
    (["compress", "{root}/bad.txt", "--out", "{root}/o.safetensors", "--max-error", "0.1"], "expected a .npy"),
    (["compress", "{root}/in.npy", "--out", "{root}/o.safetensors", "--bytes-per-sample", "8"], "bytes_per_sample >="),
    (["compress", "{root}/in.npy", "--out", "{root}/o.safetensors", "--max-error", "-1"], "finite number > 0"),
    (["compress", "{root}/in.npy", "--out", "{root}/o.safetensors"], "one of the arguments"),
    (["compress", "{root}/scalar.npy", "--out", "{root}/o.safetensors", "--max-error", "0.1"], "shape (N, ...)"),
    (["decompress", "{root}/bad.txt", "--out", "{root}/o.npy"], "missing MPS data set file"),
    (["decompress", "{root}/in.npy", "--out", "{root}/o.npy"], "expected an mpokit MPS data set file"),
    (["decompress", "{root}/in.npy", "--out", "{root}/o.csv"], "expected --out ending in"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((3, 8, 8)))
    np.save(tmp_path / "scalar.npy", np.arange(5.0))
    if "bad.txt" in argv[1] and argv[0] == "compress":
        (tmp_path / "bad.txt").write_text("1 2 3")
    with pytest.raises(SystemExit) as e:
        main(["data", *(a.format(root=tmp_path) for a in argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpokit: error:") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_refuses_existing_out(tmp_path, capsys):
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((3, 8, 8)))
    out = tmp_path / "o.safetensors"
    out.write_text("mine")
    argv = ["data", "compress", str(tmp_path / "in.npy"), "--out", str(out), "--max-error", "0.2"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err and out.read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    assert len(CompressedSet.load(out)) == 3
    back = tmp_path / "back.npy"
    back.write_text("mine too")
    with pytest.raises(SystemExit) as e:
        main(["data", "decompress", str(out), "--out", str(back)])
    assert e.value.code == 2 and back.read_text() == "mine too"
