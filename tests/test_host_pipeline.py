"""The host half of the input pipeline for encoded, variable-size images: per-example decode
and crop in grain, the same views for any number of hosts and workers, exact resume with
workers, undecodable images, and the streamed evaluation batches."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from ssl_jax import config_lib
from ssl_jax.data import host_crop, pipeline, sources

NUM_IMAGES = 23  # not a multiple of the batch: batches run across epoch boundaries
SPECS = (host_crop.CropSpec(16, (0.08, 1.0), (3 / 4, 4 / 3)),
         host_crop.CropSpec(16, (0.08, 1.0), (3 / 4, 4 / 3)),
         host_crop.CropSpec(8, (0.05, 0.4), (3 / 4, 4 / 3)))


def write_images(root: pathlib.Path, n: int, *, corrupt: tuple[int, ...] = (),
                 classes: int = 0, seed: int = 0) -> None:
  """n images of random sizes, JPEG and PNG, colour and grayscale; files listed in
  `corrupt` hold bytes that are not an image."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    folder = root / f'class{i % classes}' if classes else root
    folder.mkdir(parents=True, exist_ok=True)
    ext = 'png' if i % 3 == 0 else 'jpg'
    path = folder / f'img{i:03d}.{ext}'
    if i in corrupt:
      path.write_bytes(b'\xff\xd8\xff\xe0 not really a JPEG')
      continue
    h, w = (int(v) for v in rng.integers(20, 70, 2))
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if i % 4 == 0 else pixels)
    buf = io.BytesIO()
    image.save(buf, format='PNG' if ext == 'png' else 'JPEG', quality=90)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('images')
  write_images(root, NUM_IMAGES)
  return sources.get_source(f'folder:{root}', 'train')


def batches(source, num, **kwargs):
  kwargs = dict(dict(global_batch_size=8, seed=3, process_index=0, process_count=1,
                     crop_specs=SPECS), **kwargs)
  it = pipeline.make_train_iterator(source, **kwargs)
  return [next(it) for _ in range(num)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert len(x['views']) == len(y['views']) == len(SPECS)
    for vx, vy in zip(x['views'], y['views']):
      np.testing.assert_array_equal(vx, vy)
    np.testing.assert_array_equal(x['label'], y['label'])


def test_views_are_fixed_size_uint8_and_random(image_folder):
  # Catches: views of the stored size, not the crop size; the same box for every view or
  # every epoch (views of one image must differ between its views and between epochs).
  (first,), = [batches(image_folder, 1)]
  assert [v.shape for v in first['views']] == [(8, 16, 16, 3), (8, 16, 16, 3), (8, 8, 8, 3)]
  assert all(v.dtype == np.uint8 for v in first['views'])
  assert (first['label'] == -1).all() and (first['skipped'] == 0).all()
  assert not np.array_equal(first['views'][0], first['views'][1])
  # Every record comes round again in the next epoch, at another stream position: its views
  # must differ from those of its first pass.
  epochs = batches(image_folder, 6, shuffle=False)  # positions 0..47: records 0..22 twice
  rows = lambda p: epochs[p // 8]['views'][0][p % 8]
  assert not any(np.array_equal(rows(p), rows(p + NUM_IMAGES)) for p in range(NUM_IMAGES))


def test_views_do_not_depend_on_hosts_or_workers(image_folder):
  # Catches: randomness drawn per host, per worker or per batch position instead of from
  # (seed, stream position, view); hosts reading interleaved instead of contiguous rows.
  single = batches(image_folder, 5)
  halves = [batches(image_folder, 5, process_index=h, process_count=2) for h in range(2)]
  joined = [{'views': tuple(np.concatenate([h0['views'][v], h1['views'][v]])
                            for v in range(len(SPECS))),
             'label': np.concatenate([h0['label'], h1['label']])}
            for h0, h1 in zip(*halves)]
  assert_batches_equal(single, joined)
  assert_batches_equal(single, batches(image_folder, 5, worker_count=2))


def test_resume_with_workers_sees_the_same_views(image_folder):
  # Catches: a worker iterator whose state does not restore (restarting at batch 0, or
  # skipping the prefetched batches), and a state that only the same worker count can
  # restore (a resumed run on a machine with other cores).
  straight = batches(image_folder, 6)
  make = lambda workers: pipeline.make_train_iterator(
      image_folder, global_batch_size=8, seed=3, process_index=0, process_count=1,
      crop_specs=SPECS, worker_count=workers)
  it = make(2)
  assert_batches_equal(straight[:3], [next(it) for _ in range(3)])
  state = it.get_state()
  it.close()
  assert state == {'next_index': 3}
  for workers in (2, 1, 0):
    resumed = make(workers)
    resumed.set_state(state)
    assert_batches_equal(straight[3:], [next(resumed) for _ in range(3)])
    resumed.close()


def test_undecodable_image_is_replaced_counted_or_fatal(tmp_path, caplog):
  # Catches: a corrupt file ending the run, a skip that changes the batch size or is not
  # counted, a warning that does not name the file, and skip_corrupt=False not being fatal.
  write_images(tmp_path, 12, corrupt=(5,))
  source = sources.get_source(f'folder:{tmp_path}', 'train')
  bad = next(i for i in range(len(source)) if source.describe(i).endswith('img005.jpg'))
  # Three epochs: the corrupt file is met three times.
  got = batches(source, 3, global_batch_size=12, shuffle=False)
  skipped = sum(int(b['skipped'].sum()) for b in got)
  assert skipped == 3
  for epoch, b in enumerate(got):
    assert b['views'][0].shape[0] == 12 and b['skipped'][bad] == 1
    assert b['skipped'].sum() == 1
    # The replacement is the next record (without shuffling, position = record index),
    # cropped with the randomness of the bad image's own position.
    position = 12 * epoch + bad
    expected = host_crop.random_views(host_crop.decode_image(source[bad + 1]['image']),
                                      SPECS, 3, position)
    for view, want in zip(b['views'], expected):
      np.testing.assert_array_equal(view[bad], want)
  assert 'img005.jpg' in caplog.text
  with pytest.raises(ValueError, match=r'img005\.jpg.*skip_corrupt'):
    batches(source, 1, global_batch_size=12, shuffle=False, skip_corrupt=False)


def test_many_undecodable_images_in_a_row_stop_the_run(tmp_path, monkeypatch):
  # Catches: a folder of undecodable files (a wrong format, an empty disk image) skipped
  # forever instead of stopping with a message.
  write_images(tmp_path, 6, corrupt=(0, 1, 2, 3))
  source = sources.get_source(f'folder:{tmp_path}', 'train')
  monkeypatch.setattr(pipeline, 'MAX_CONSECUTIVE_CORRUPT', 3)
  with pytest.raises(config_lib.DataError, match='3 consecutive images'):
    batches(source, 1, global_batch_size=2, shuffle=False)


def test_encoded_source_needs_crop_specs(image_folder):
  # Catches: variable-size images silently batched as stored (the original failure).
  with pytest.raises(ValueError, match='crop_specs'):
    pipeline.make_train_iterator(image_folder, global_batch_size=8, seed=0,
                                 process_index=0, process_count=1)


def test_eval_batches_are_padded_sharded_by_host_and_centre_cropped(tmp_path):
  # Catches: the last partial batch dropped or not masked, hosts reading overlapping rows,
  # undecodable evaluation images counted as valid, and a transform other than the
  # short-side resize and central crop.
  write_images(tmp_path, 11, corrupt=(4,), classes=2)
  source = sources.get_source(f'folder:{tmp_path}', 'train')
  transform = pipeline.EvalTransform(resize_size=18, crop_size=16, channels=3)
  single = list(pipeline.make_eval_iterator(source, global_batch_size=4,
                                            transform=transform, process_index=0,
                                            process_count=1))
  assert len(single) == 3  # 11 examples in batches of 4: the last padded with one row
  valid = np.concatenate([b['valid'] for b in single])
  bad = next(i for i in range(len(source)) if source.describe(i).endswith('img004.jpg'))
  assert valid.tolist() == [i < 11 and i != bad for i in range(12)]
  labels = np.concatenate([b['label'] for b in single])[valid]
  np.testing.assert_array_equal(labels, np.delete(source.labels, bad))
  for h in range(2):
    rows = list(pipeline.make_eval_iterator(source, global_batch_size=4,
                                            transform=transform, process_index=h,
                                            process_count=2))
    assert len(rows) == len(single)
    for whole, part in zip(single, rows):
      np.testing.assert_array_equal(part['image'], whole['image'][2 * h:2 * h + 2])
      np.testing.assert_array_equal(part['valid'], whole['valid'][2 * h:2 * h + 2])
  first = host_crop.decode_image(source[0]['image'], 3)
  np.testing.assert_array_equal(single[0]['image'][0], host_crop.center_crop(first, 18, 16))
  images, labels = pipeline.make_eval_arrays(source, transform=transform)
  assert images.shape == (10, 16, 16, 3) and len(labels) == 10
