"""Preprocessing: image geometry, colour, normalisation, layout, dtype; sensor windows."""

from __future__ import annotations

import numpy as np
import pytest

from agent.inference.processing.pre import FrameRejectedError, Geometry, PreprocessConfig, Preprocessor

pytestmark = pytest.mark.arm64


def bgr(h: int, w: int, color: tuple[int, int, int] = (10, 20, 30)) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[:] = color
    return img


def test_resize_rgb_mean_std_nchw_matches_the_formula() -> None:
    cfg = PreprocessConfig(resize=(64, 48), color="rgb", scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    tensor, geo = Preprocessor(cfg, [1, 3, 48, 64], "tensor(float)")(bgr(480, 640, (10, 20, 30)))
    assert tensor.shape == (1, 3, 48, 64) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
    # BGR (10, 20, 30) is RGB (30, 20, 10): channel 0 of the tensor is red.
    expected = [(30 / 255 - 0.5) / 0.2, (20 / 255 - 0.4) / 0.25, (10 / 255 - 0.3) / 0.5]
    assert np.allclose(tensor[0, :, 10, 10], expected, atol=1e-5)
    assert geo == Geometry(640, 480, 0, 0, 0.1, 0.1, 0.0, 0.0)


def test_letterbox_keeps_aspect_and_maps_boxes_back_to_source_pixels() -> None:
    cfg = PreprocessConfig(resize=(320, 320), letterbox=True, color="bgr", scale=1 / 255)
    tensor, geo = Preprocessor(cfg)(bgr(480, 640, (255, 255, 255)))
    assert tensor.shape == (1, 3, 320, 320)
    assert geo.scale_x == geo.scale_y == 0.5 and geo.pad_x == 0 and geo.pad_y == 40
    assert tensor[0, 0, 0, 0] == pytest.approx(114 / 255)  # padding
    assert tensor[0, 0, 100, 100] == pytest.approx(1.0)  # image
    assert geo.box_to_source([10, 50, 110, 90]) == [20, 20, 220, 100]
    assert geo.box_to_source([-5, 0, 400, 400]) == [0, 0, 640, 480]  # clipped to the frame


def test_crop_is_offset_in_the_geometry_and_rejected_when_it_does_not_fit() -> None:
    cfg = PreprocessConfig(crop=(100, 50, 200, 100), resize=(100, 50), color="gray", layout="nhwc", dtype="uint8")
    img = bgr(240, 320)
    img[50:150, 100:300] = 200
    tensor, geo = Preprocessor(cfg)(img)
    assert tensor.shape == (1, 50, 100, 1) and tensor.dtype == np.uint8 and (tensor == 200).all()
    assert geo.box_to_source([0, 0, 50, 25]) == [100, 50, 200, 100]
    with pytest.raises(FrameRejectedError, match=r"crop \[100, 50, 200, 100\] does not fit in a 150x100 frame"):
        Preprocessor(cfg)(bgr(100, 150))


def test_grey_source_frames_become_three_channels_when_the_model_wants_rgb() -> None:
    tensor, _ = Preprocessor(PreprocessConfig(color="rgb"))(np.full((4, 6), 7, dtype=np.uint8))
    assert tensor.shape == (1, 3, 4, 6) and (tensor == 7).all()


def test_a_frame_of_the_wrong_size_is_rejected_with_the_shapes() -> None:
    pre = Preprocessor(PreprocessConfig(), [1, 3, 480, 640], "tensor(float)")
    with pytest.raises(
        FrameRejectedError, match=r"would be \[1, 3, 240, 320\] but the model wants \[1, 3, 480, 640\].*resize"
    ):
        pre(bgr(240, 320))
    with pytest.raises(FrameRejectedError, match="expected an 8-bit"):
        pre(np.zeros((4, 4, 3), dtype=np.float32))


def test_dtype_follows_the_model_input_unless_the_profile_sets_it() -> None:
    assert Preprocessor(PreprocessConfig(), [1, 3], "tensor(double)").sensor(np.array([1.0, 2, 3])).dtype == np.float64
    assert (
        Preprocessor(PreprocessConfig(dtype="float32"), [1, 3], "tensor(double)").sensor(np.array([1.0, 2, 3])).dtype
        == np.float32
    )


def test_sensor_windows_stack_with_hop_and_normalise_per_channel() -> None:
    cfg = PreprocessConfig(window=4, hop=2, layout="ncw", mean=(1.0, 10.0), std=(1.0, 2.0))
    pre = Preprocessor(cfg, [1, 2, 4], "tensor(float)")
    outs = [pre.sensor(np.array([i, 10 + 2 * i], dtype=float)) for i in range(8)]
    assert [o is not None for o in outs] == [False, False, False, True, False, True, False, True]
    first = outs[3]
    assert first.shape == (1, 2, 4)
    assert np.allclose(first[0, 0], [-1, 0, 1, 2]) and np.allclose(first[0, 1], [0, 1, 2, 3])
    assert np.allclose(outs[5][0, 0], [1, 2, 3, 4])


def test_sensor_layout_nc_flattens_time_major_and_image_layouts_follow_the_model_rank() -> None:
    pre = Preprocessor(PreprocessConfig(window=2, layout="nc"), [1, 6])
    pre.sensor(np.array([1.0, 2, 3]))
    assert pre.sensor(np.array([4.0, 5, 6])).tolist() == [[1, 2, 3, 4, 5, 6]]
    assert Preprocessor(PreprocessConfig(), [None, 576]).sensor(np.zeros(576)).shape == (1, 576)
    with pytest.raises(FrameRejectedError, match=r"would be \[1, 3\] but the model wants \[\?, 4\]"):
        Preprocessor(PreprocessConfig(), [None, 4]).sensor(np.zeros(3))


def test_a_sample_with_a_different_channel_count_is_rejected() -> None:
    pre = Preprocessor(PreprocessConfig(window=3))
    pre.sensor(np.zeros(2))
    with pytest.raises(FrameRejectedError, match="sample has 3 values, earlier samples had 2"):
        pre.sensor(np.zeros(3))


@pytest.mark.parametrize(
    "fields",
    [
        {"color": "rgb", "scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
        {"color": "bgr", "scale": 1 / 255, "layout": "nhwc"},
        {"color": "rgb", "resize": (40, 40), "letterbox": True, "mean": (100.0,), "std": (50.0,)},
        {"color": "bgr"},
    ],
)
def test_the_fused_opencv_path_equals_the_numpy_reference(fields: dict) -> None:
    img = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    fast = Preprocessor(PreprocessConfig(**fields))
    reference = Preprocessor(PreprocessConfig(**fields))
    reference.fast = False
    a, geo_a = fast(img)
    b, geo_b = reference(img)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32 and geo_a == geo_b
    assert np.allclose(a, b, atol=1e-4)
