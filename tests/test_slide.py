"""Slide reading: real Zeiss files, slide coordinates, background fill, TIFF, bad files."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from bmseg.errors import BmsegError
from bmseg.slide import Channel, Rect, open_slide, parse_plane
from bmseg.synth import describe_channels, section_image, write_frames_czi

# Bounds, pixel sizes, channels and pixel types as ../shared/czi/README.md lists them.
REAL_FILES = {
    "RGB-multichannel.czi": (Rect(0, 0, 147, 81), 2.9584899946757142, 7, "Bgr24"),
    "1_tileregion.czi": (Rect(118583, 88865, 1480, 570), 0.4, 1, "Gray16"),
    "S3_1Pos_2Mosaic_T1_Z1_CH1.czi": (Rect(0, 0, 645, 514), 1.6, 1, "Gray16"),
    "tiles.czi": (Rect(-127, -128, 510, 512), 0.83026582096383912, 2, "Gray8"),
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_zeiss_files_open_with_their_bounds_and_pixel_size(shared_czi, name):
    bounds, pixel_size, czi_channels, pixel_type = REAL_FILES[name]
    with open_slide(shared_czi / name) as slide:
        assert slide.bounds == bounds
        assert slide.pixel_size_um == pytest.approx(pixel_size, rel=1e-9)
        rgb = pixel_type == "Bgr24"
        assert len(slide.channels) == czi_channels * (3 if rgb else 1)
        assert slide.modality == ("brightfield" if rgb else "fluorescence")
        dtype = {"Bgr24": "uint8", "Gray8": "uint8", "Gray16": "uint16"}[pixel_type]
        assert {c.dtype for c in slide.channels} == {dtype}
        image = slide.read(bounds.x, bounds.y, bounds.w, bounds.h)
        assert image.shape == (bounds.h, bounds.w, len(slide.channels))
        assert image.any()
        half = slide.read(bounds.x, bounds.y, bounds.w, bounds.h, zoom=0.5)
        assert half.shape == (round(bounds.h * 0.5), round(bounds.w * 0.5), len(slide.channels))
        thumbnail, zoom = slide.thumbnail(64)
        assert max(thumbnail.shape[:2]) == 64
        assert zoom == pytest.approx(64 / max(bounds.w, bounds.h))


def test_channel_names_come_from_the_metadata(shared_czi):
    with open_slide(shared_czi / "tiles.czi") as slide:
        assert slide.channels == [Channel("Ch1", "uint8"), Channel("T PMT", "uint8")]
    with open_slide(shared_czi / "RGB-multichannel.czi") as slide:
        assert [c.name for c in slide.channels[:4]] == [
            "Bright_R",
            "Bright_G",
            "Bright_B",
            "Pol_0_R",
        ]


def test_area_between_scenes_reads_as_fluorescence_background(shared_czi):
    # Scene 1 spans x 0-64, y 213-277 and scene 0 starts at x 145: nothing was acquired in
    # x 0-140, y 0-200.
    with open_slide(shared_czi / "S3_1Pos_2Mosaic_T1_Z1_CH1.czi") as slide:
        assert not slide.read(0, 0, 140, 200).any()
        assert slide.read(0, 213, 64, 64).any()


def test_scenes_far_apart_in_stage_coordinates_keep_their_positions(make_czi):
    red = np.zeros((64, 96, 3), np.uint8)
    red[...] = (200, 30, 10)
    blue = np.zeros((32, 32, 3), np.uint8)
    blue[...] = (5, 40, 220)
    path = make_czi("stage.czi", [(100_000, 50_000, red), (103_000, 49_000, blue)], 0.25)
    with open_slide(path) as slide:
        assert slide.bounds == Rect(100_000, 49_000, 3032, 1064)
        assert slide.modality == "brightfield"
        assert slide.pixel_size_um == pytest.approx(0.25)
        assert slide.channels == [Channel(c, "uint8") for c in "RGB"]
        tile = slide.read(100_000, 50_000, 96, 64)
        assert (tile == (200, 30, 10)).all()  # RGB order, not the file's BGR
        gap = slide.read(101_000, 49_500, 500, 300)
        assert (gap == 255).all()  # never acquired: white
        straddle = slide.read(102_990, 48_990, 30, 20)
        assert (straddle[:10] == 255).all() and (straddle[10:, 10:] == (5, 40, 220)).all()


def test_negative_origin_and_zoomed_reads(make_czi):
    gradient = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    path = make_czi("negative.czi", [(-150, -40, gradient)], 1.0)
    with open_slide(path) as slide:
        assert slide.bounds == Rect(-150, -40, 200, 100)
        assert slide.modality == "fluorescence"
        row = slide.read(-150, -40, 200, 1)[0, :, 0]
        np.testing.assert_array_equal(row, np.arange(200))
        small = slide.read(-150, -40, 200, 100, zoom=0.25)
        assert small.shape == (25, 50, 1)
        # output pixel j shows slide pixel x + j / zoom
        assert abs(int(small[10, 20, 0]) - 80) <= 4
        outside = slide.read(-400, -40, 100, 10)
        assert not outside.any()


def test_one_slide_per_thread_reads_the_same_pixels(synthetic_slide):
    czi_path, _ = synthetic_slide
    with open_slide(czi_path) as slide:
        expected = [slide.read(x, 1000, 512, 512) for x in range(0, 4000, 1000)]
    results: dict[int, list[np.ndarray]] = {}

    def work(index: int) -> None:
        with open_slide(czi_path) as own:
            results[index] = [own.read(x, 1000, 512, 512) for x in range(0, 4000, 1000)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for images in results.values():
        for image, reference in zip(images, expected, strict=True):
            np.testing.assert_array_equal(image, reference)


def test_ome_tiff_rgb_with_pixel_size(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "section 1.ome.tif"
    tifffile.imwrite(
        path, data, photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.345}
    )
    with open_slide(path) as slide:
        assert slide.slide_id == "section_1"
        assert slide.pixel_size_um == pytest.approx(0.345)
        assert slide.modality == "brightfield"
        assert slide.bounds == Rect(0, 0, 400, 300)
        np.testing.assert_array_equal(slide.read(50, 20, 100, 60), data[20:80, 50:150])
        corner = slide.read(350, 250, 100, 100)
        assert (corner[50:, :] == 255).all() and (corner[:, 50:] == 255).all()
        np.testing.assert_array_equal(corner[:50, :50], data[250:, 350:])


def test_ome_tiff_fluorescence_channels_and_pyramid(tmp_path):
    data = np.zeros((2, 512, 512), np.uint16)
    data[0, 100:200, 100:300] = 1000
    data[1, 300:400, :] = 3000
    path = tmp_path / "fluo.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        options = {
            "tile": (128, 128),
            "metadata": {"axes": "CYX", "Channel": {"Name": ["DAPI", "CD34"]}},
        }
        tif.write(data, subifds=1, resolution=(1 / 0.5e-4, 1 / 0.5e-4), **options)
        # The level differs from a downsampled base by one, to show which one a read used.
        tif.write(data[:, ::4, ::4] + 1, subfiletype=1, tile=(128, 128))
    with open_slide(path, pixel_size_um=0.5) as slide:
        assert slide.channels == [Channel("DAPI", "uint16"), Channel("CD34", "uint16")]
        assert slide.modality == "fluorescence"
        np.testing.assert_array_equal(slide.read(0, 0, 512, 512), data.transpose(1, 2, 0))
        thumbnail, zoom = slide.thumbnail(128)
        assert zoom == 0.25
        np.testing.assert_array_equal(thumbnail, data[:, ::4, ::4].transpose(1, 2, 0) + 1)


def test_tiled_tiff_reads_decode_only_the_tiles_the_window_meets(tmp_path, monkeypatch):
    """A 20 GB slide must never be loaded whole: a read fetches just the tiles under it."""
    from tifffile.zarr import ZarrTiffStore

    rng = np.random.default_rng(3)
    data = rng.integers(0, 255, (1024, 1280, 3), dtype=np.uint8)  # 4 x 5 tiles of 256 px
    path = tmp_path / "tiled.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(data, tile=(256, 256), photometric="rgb", subifds=1, compression="zlib")
        tif.write(data[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)

    def whole_read(*args, **kwargs):
        raise AssertionError("a whole level was read")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole_read)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", whole_read)
    fetched: list[str] = []
    get = ZarrTiffStore.get

    async def counting_get(self, key, *args, **kwargs):
        if key[0].isdigit():  # a chunk (tile), not metadata
            fetched.append(key)
        return await get(self, key, *args, **kwargs)

    monkeypatch.setattr(ZarrTiffStore, "get", counting_get)
    with open_slide(path, pixel_size_um=0.5) as slide:
        # (tile row, tile column) of every tile a window of the full-resolution level meets
        for (x, y, w, h), tiles in (
            ((300, 270, 100, 100), {(1, 1)}),
            ((200, 200, 100, 100), {(0, 0), (0, 1), (1, 0), (1, 1)}),
            ((1200, 1000, 200, 50), {(3, 4)}),  # partly outside: background fill
        ):
            fetched.clear()
            image = slide.read(x, y, w, h)
            assert {tuple(int(i) for i in key.split(".")[:2]) for key in fetched} == tiles
            inside = data[y : y + h, x : x + w]
            np.testing.assert_array_equal(image[: inside.shape[0], : inside.shape[1]], inside)
            assert (image[inside.shape[0] :] == 255).all()
            assert (image[:, inside.shape[1] :] == 255).all()
        fetched.clear()  # half resolution comes from the pyramid level, one of its 2 x 3 tiles
        image = slide.read(512, 512, 512, 512, zoom=0.5)
        assert fetched == ["1.1.0"]
        np.testing.assert_array_equal(image, data[::2, ::2][256:512, 256:512])


def test_tiff_resolution_tags_give_the_pixel_size(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(
        path,
        np.ones((64, 64), np.uint8),
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as slide:
        assert slide.pixel_size_um == pytest.approx(0.25)


def test_missing_pixel_size_asks_for_the_flag_and_the_flag_fixes_it(tmp_path, make_czi):
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, np.ones((64, 64), np.uint8))
    with pytest.raises(BmsegError, match="pass --pixel-size-um") as error:
        open_slide(path)
    assert str(path) in str(error.value)
    with open_slide(path, pixel_size_um=0.2) as slide:
        assert slide.pixel_size_um == 0.2
    czi_path = make_czi("noscale.czi", [(0, 0, np.ones((32, 32), np.uint8))], None)
    with pytest.raises(BmsegError, match="pass --pixel-size-um"):
        open_slide(czi_path)
    with open_slide(czi_path, pixel_size_um=0.1725) as slide:
        assert slide.pixel_size_um == 0.1725


def test_override_replaces_the_metadata_pixel_size(synthetic_slide):
    with open_slide(synthetic_slide[0], pixel_size_um=0.3) as slide:
        assert slide.pixel_size_um == 0.3


def test_override_is_logged_once_per_slide_and_only_when_it_differs(synthetic_slide, caplog):
    path = synthetic_slide[0]
    caplog.set_level("INFO", logger="bmseg.slide")
    for _ in range(3):  # SEGMENT opens a slide per reader thread and per batch
        with open_slide(path, pixel_size_um=0.1725):  # the metadata's own value
            pass
    assert not [r for r in caplog.records if "overrides" in r.getMessage()]
    for _ in range(3):
        with open_slide(path, pixel_size_um=0.25):
            pass
    logged = [r.getMessage() for r in caplog.records if "overrides" in r.getMessage()]
    assert logged == [f"{path}: pixel size 0.25 µm overrides the metadata's 0.1725 µm"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("fake.czi", b"PK\x03\x04 this is a zip, not a CZI", "not a CZI file"),
        ("notes.txt", b"hello", "not a CZI or TIFF file"),
    ],
)
def test_files_that_are_not_slides_get_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BmsegError, match=message) as error:
        open_slide(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_truncated_czi_is_a_one_line_error(tmp_path, synthetic_slide):
    data = synthetic_slide[0].read_bytes()
    path = tmp_path / "cut.czi"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BmsegError, match="truncated") as error, open_slide(path) as slide:
        slide.read(0, 0, 4000, 4000)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(BmsegError, match="no such slide file") as error:
        open_slide(tmp_path / "absent.czi")
    assert "absent.czi" in str(error.value)


def test_slide_ids(make_czi):
    path = make_czi("patient 7#B.czi", [(0, 0, np.ones((8, 8), np.uint8))])
    with open_slide(path) as slide:
        assert slide.slide_id == "patient_7_B"
    with open_slide(path, slide_id="P7-B.2") as slide:
        assert slide.slide_id == "P7-B.2"
    with pytest.raises(BmsegError, match="--slide-id"):
        open_slide(path, slide_id="P7/B")


# ------------------------------------------------------------- modality, names, scenes, planes

REAL_MODALITIES = {
    "RGB-multichannel.czi": "brightfield",  # ContrastMethod Brightfield (+ PolarizedLight)
    "1_tileregion.czi": "fluorescence",
    "S3_1Pos_2Mosaic_T1_Z1_CH1.czi": "fluorescence",
    "tiles.czi": "fluorescence",  # confocal: Fluorescence + a transmitted PMT channel
}


@pytest.mark.parametrize("name", sorted(REAL_MODALITIES))
def test_real_zeiss_files_take_their_modality_from_the_metadata(shared_czi, name):
    with open_slide(shared_czi / name) as slide:
        assert (slide.modality, slide.modality_source) == (REAL_MODALITIES[name], "metadata")


def _one_frame(tmp_path, name, image, channels, scene_gap=None):
    frames = [(0, 0, image, {"C": 0}, 0)]
    if scene_gap is not None:  # a second section: un-acquired area between the two
        frames.append((image.shape[1] + scene_gap, 0, image, {"C": 0}, 1))
    path = write_frames_czi(tmp_path / name, frames, 0.5)
    if channels:
        describe_channels(path, channels)
    return path


def test_grey_brightfield_by_its_metadata_reads_white_between_scenes(tmp_path):
    grey = section_image(120, 160, 1, background=235, tissue=140)  # bright glass, dark tissue
    path = _one_frame(tmp_path, "grey.czi", grey, [{"ContrastMethod": "Brightfield"}], 100)
    with open_slide(path) as slide:
        assert (slide.modality, slide.modality_source) == ("brightfield", "metadata")
        assert slide.background.tolist() == [255]
        assert (slide.read(170, 0, 80, 100) == 255).all()  # the gap between the sections


def test_colour_fluorescence_by_its_metadata_reads_black_between_scenes(tmp_path):
    dark = section_image(120, 160, 2, background=8, tissue=150, channels=3)
    path = _one_frame(tmp_path, "dark.czi", dark, [{"ContrastMethod": "Fluorescence"}], 100)
    with open_slide(path) as slide:
        assert (slide.modality, slide.modality_source) == ("fluorescence", "metadata")
        assert slide.background.tolist() == [0, 0, 0]
        assert not slide.read(170, 0, 80, 100).any()


@pytest.mark.parametrize(
    ("name", "background", "tissue", "channels", "modality"),
    [
        ("grey_bright.czi", 235, 140, 1, "brightfield"),
        ("colour_dark.czi", 8, 150, 3, "fluorescence"),
        ("colour_bright.czi", 240, 150, 3, "brightfield"),
        ("grey_dark.czi", 10, 120, 1, "fluorescence"),
    ],
)
def test_silent_metadata_leaves_the_modality_to_the_background(
    tmp_path, name, background, tissue, channels, modality
):
    image = section_image(200, 240, 3, background=background, tissue=tissue, channels=channels)
    with open_slide(_one_frame(tmp_path, name, image, None)) as slide:
        assert (slide.modality, slide.modality_source) == (modality, "image")


def test_a_blank_flat_frame_falls_back_to_the_pixel_type(tmp_path):
    flat = np.full((64, 64, 3), 128, np.uint8)
    with open_slide(_one_frame(tmp_path, "flat.czi", flat, None)) as slide:
        assert (slide.modality, slide.modality_source) == ("brightfield", "pixel type")


def test_modality_override_beats_the_metadata(synthetic_slide):
    with open_slide(synthetic_slide[0], modality="fluorescence") as slide:
        assert (slide.modality, slide.modality_source) == ("fluorescence", "override")
        assert not slide.background.any()
    with pytest.raises(BmsegError, match="--modality"):
        open_slide(synthetic_slide[0], modality="darkfield")


def test_ome_contrast_method_decides_the_modality(tmp_path):
    path = tmp_path / "grey_bf.ome.tif"
    image = section_image(128, 128, 4, background=20, tissue=200)  # looks dark-field...
    metadata = {"axes": "YX", "Channel": {"Name": ["TL"], "ContrastMethod": ["Brightfield"]}}
    tifffile.imwrite(path, image, metadata=metadata)
    with open_slide(path, pixel_size_um=0.5) as slide:  # ...but the metadata says brightfield
        assert (slide.modality, slide.modality_source) == ("brightfield", "metadata")


def test_channel_names_fall_back_through_the_display_settings(tmp_path):
    frames = [(0, 0, np.full((32, 32), 9 * c, np.uint8), {"C": c}, 0) for c in range(4)]
    path = write_frames_czi(tmp_path / "names.czi", frames, 0.5)
    describe_channels(
        path,
        [
            {"DisplayName": "DAPI"},
            {"ShortName": "GFP", "DyeName": "EGFP"},
            {"DyeName": "Cy5"},
            {},
        ],
    )
    with open_slide(path) as slide:
        assert [c.name for c in slide.channels] == ["DAPI", "GFP", "Cy5", "C3"]


def test_scenes_of_a_real_file_are_listed(shared_czi):
    with open_slide(shared_czi / "S3_1Pos_2Mosaic_T1_Z1_CH1.czi") as slide:
        assert slide.scenes == [
            Rect(145, 0, 295, 122),
            Rect(0, 213, 64, 64),
            Rect(293, 277, 352, 237),
        ]
    with open_slide(shared_czi / "tiles.czi") as slide:  # no scene index: the whole bounds
        assert slide.scenes == [slide.bounds]


def test_scenes_200000_px_apart_read_without_a_crash(tmp_path):
    section = section_image(300, 400, 5, background=235, tissue=140, channels=3)
    frames = [(0, 0, section, {"C": 0}, 0), (200_000, 0, section, {"C": 0}, 1)]
    path = write_frames_czi(tmp_path / "far.czi", frames, 0.5)
    with open_slide(path) as slide:
        assert slide.scenes == [Rect(0, 0, 400, 300), Rect(200_000, 0, 400, 300)]
        thumbnail, _ = slide.thumbnail(256)  # a strip a fraction of a pixel tall
        assert thumbnail.shape == (1, 256, 3)
        assert slide.modality == "brightfield"


def _stack(tmp_path, dims: dict[str, int]) -> tuple[Path, np.ndarray]:
    """A 2-channel CZI whose pixel value encodes its plane: 10*Z + 40*T + channel."""
    import itertools

    frames, values = [], {}
    for indices in itertools.product(*(range(n) for n in dims.values())):
        plane = dict(zip(dims, indices, strict=True))
        for c in range(2):
            value = 10 * plane.get("Z", 0) + 40 * plane.get("T", 0) + c
            values[(*indices, c)] = value
            frames.append((0, 0, np.full((16, 16), value, np.uint8), {**plane, "C": c}, 0))
    return write_frames_czi(tmp_path / "stack.czi", frames, 0.5), values


def test_extra_planes_warn_once_and_are_recorded(tmp_path, caplog):
    path, _ = _stack(tmp_path, {"Z": 3, "T": 2})
    with caplog.at_level("WARNING"):
        with open_slide(path) as slide:
            assert slide.plane == {"T": 0, "Z": 0}
            assert slide.read(0, 0, 16, 16)[0, 0].tolist() == [0, 1]
        open_slide(path).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2  # Z and T, once each although the file was opened twice
    assert any("Z has 3 planes" in w for w in warnings)
    assert any("T has 2 planes" in w for w in warnings)


def test_plane_choice_and_maximum_projection(tmp_path):
    path, _ = _stack(tmp_path, {"Z": 3, "T": 2})
    with open_slide(path, plane=parse_plane("Z=2,T=1")) as slide:
        assert slide.plane == {"T": 1, "Z": 2}
        assert slide.read(0, 0, 16, 16)[0, 0].tolist() == [60, 61]
    with open_slide(path, plane=parse_plane("Z=max")) as slide:
        assert slide.plane == {"T": 0, "Z": "max"}
        assert slide.read(0, 0, 16, 16)[0, 0].tolist() == [20, 21]


@pytest.mark.parametrize(
    ("text", "message"),
    [("Z=5", "Z 0 to 2"), ("Q=1", "no Q dimension"), ("Z=top", "DIM=INDEX"), ("Z", "DIM=INDEX")],
)
def test_bad_plane_choices_are_one_line_errors(tmp_path, text, message):
    path, _ = _stack(tmp_path, {"Z": 3})
    with pytest.raises(BmsegError, match=message) as error:
        open_slide(path, plane=parse_plane(text))
    assert "\n" not in str(error.value)


def test_tiff_planes_and_projection(tmp_path):
    data = np.arange(3, dtype=np.uint16)[:, None, None] * 100 + np.zeros((3, 32, 32), np.uint16)
    path = tmp_path / "zstack.ome.tif"
    tifffile.imwrite(path, data, metadata={"axes": "ZYX"})
    with open_slide(path, pixel_size_um=0.5) as slide:
        assert slide.plane == {"Z": 0} and slide.read(0, 0, 8, 8).max() == 0
    with open_slide(path, pixel_size_um=0.5, plane={"Z": 1}) as slide:
        assert (slide.read(0, 0, 8, 8) == 100).all()
    with open_slide(path, pixel_size_um=0.5, plane={"Z": "max"}) as slide:
        assert (slide.read(0, 0, 8, 8) == 200).all()


def test_an_undecodable_subblock_is_a_one_line_error(tmp_path):
    """libCZI decodes every compression (zstd here, JPEG-XR on Axioscans); a subblock its
    decoder refuses must still be one line naming the file, not a traceback."""
    from pylibCZIrw import czi

    path = tmp_path / "zstd.czi"
    noise = np.random.default_rng(0).integers(0, 50, (256, 256, 1)).astype(np.uint8)
    with czi.create_czi(str(path), exist_ok=True, compression_options="zstd1:ExplicitLevel=1") as w:
        w.write(noise, location=(0, 0))
        w.write_metadata(document_name="zstd", scale_x=1e-6, scale_y=1e-6)
    data = bytearray(path.read_bytes())
    frame = data.find(bytes([0x28, 0xB5, 0x2F, 0xFD]), data.find(b"ZISRAWSUBBLOCK"))
    assert frame > 0  # the zstd frame of the one subblock
    data[frame : frame + 4] = bytes(4)  # its magic number gone: the decoder gives up
    damaged = tmp_path / "damaged.czi"
    damaged.write_bytes(bytes(data))
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read(0, 0, 256, 256), noise)
    with pytest.raises(BmsegError, match="cannot read pixels") as error, open_slide(damaged) as s:
        s.read(0, 0, 256, 256)
    assert "damaged.czi" in str(error.value) and "\n" not in str(error.value)


def test_the_image_decides_the_modality_once_per_file(tmp_path, monkeypatch):
    """SEGMENT opens one Slide per reader thread: the probe read must not repeat."""
    from bmseg.slide import modality as modality_rules

    calls = []
    decide = modality_rules.modality_from_image
    monkeypatch.setattr(
        modality_rules, "modality_from_image", lambda slide: calls.append(1) or decide(slide)
    )
    image = section_image(200, 240, 6, background=235, tissue=140)
    path = _one_frame(tmp_path, "once.czi", image, None)
    for _ in range(3):
        with open_slide(path) as slide:
            assert (slide.modality, slide.modality_source) == ("brightfield", "image")
    assert len(calls) == 1
