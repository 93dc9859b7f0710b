"""The toy base is cached by what the data holds, not where it lies."""

from sdpo.data.pickapic import ingest
from sdpo.data.synthetic import make_pairs, write_parquet
from sdpo.train.pretrain import data_content_digest


def test_toy_base_cache_key_ignores_where_the_data_was_made(tmp_path):
    table = make_pairs(6, 0)
    for name in ("run-a", "run-b"):
        parquet = write_parquet(table, tmp_path / name / "train.parquet")
        ingest(str(parquet), tmp_path / name / "shards")
    assert data_content_digest(tmp_path / "run-a" / "shards") == data_content_digest(tmp_path / "run-b" / "shards")
    other = write_parquet(make_pairs(6, 1), tmp_path / "run-c" / "train.parquet")
    ingest(str(other), tmp_path / "run-c" / "shards")
    assert data_content_digest(tmp_path / "run-c" / "shards") != data_content_digest(tmp_path / "run-a" / "shards")


def test_pyramid_and_offset_noise_keep_unit_scale_and_add_coarse_structure():
    import torch

    from sdpo.config import ToyBaseConfig
    from sdpo.train.pretrain import _training_noise

    base = torch.randn((256, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    plain = _training_noise(base.clone(), ToyBaseConfig(), torch.Generator().manual_seed(1))
    assert torch.equal(plain, base)  # the default recipe draws nothing more
    pyramid = _training_noise(base.clone(), ToyBaseConfig(multires_noise=0.8), torch.Generator().manual_seed(1))
    assert torch.allclose(pyramid.std(dim=(1, 2, 3)), torch.ones(256), atol=1e-4)  # renormalised per sample
    # coarse scales make the per-sample mean (what a 1x1 view of x_T shows) vary far more than white noise's 1/32
    assert pyramid.mean(dim=(2, 3)).std() > 3 * base.mean(dim=(2, 3)).std()
    offset = _training_noise(base.clone(), ToyBaseConfig(noise_offset=0.5), torch.Generator().manual_seed(1))
    shift = offset - base
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # one constant per sample and channel
    assert 0.3 < float(shift[:, :, 0, 0].std()) < 0.7
