"""Geometry of the GIMP plug-in (vg_prepare.py) and its settings file (vg_settings.py),
without GIMP: source regions, square modes (crop, pad, stretch), upload sizes and where
results land; settings file mode 0600 and environment overrides."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "gimp"
                       / "generate-variations"))

import vg_prepare
import vg_settings
from vg_prepare import Placement, PrepareError, Rect, make_plan, place

# ------------------------------------------------------------------ source region


def test_whole_layer_without_selection_keeps_offsets() -> None:
    assert vg_prepare.source_region(30, 40, 240, 160, None) == Rect(30, 40, 240, 160)


def test_selection_is_clipped_to_the_layer() -> None:
    # Selection (0,0)-(100,100) on a layer at (30,40) of 240x160.
    assert vg_prepare.source_region(30, 40, 240, 160, (0, 0, 100, 100)) == Rect(30, 40, 70, 60)
    # Negative layer offsets.
    assert vg_prepare.source_region(-50, -20, 200, 100, (0, 0, 400, 400)) == Rect(0, 0, 150, 80)


def test_selection_outside_the_layer_is_a_sentence() -> None:
    with pytest.raises(PrepareError, match="does not overlap the active layer"):
        vg_prepare.source_region(0, 0, 100, 100, (200, 200, 300, 300))
    with pytest.raises(PrepareError, match="empty"):
        vg_prepare.source_region(0, 0, 0, 10, None)


# ------------------------------------------------------------------ square modes


def test_center_crop_of_a_landscape_layer() -> None:
    p = make_plan(0, 0, 300, 200, None, "selection-or-center-crop", "256x256")
    assert p.region == Rect(0, 0, 300, 200)
    assert p.cover == Rect(50, 0, 200, 200)
    assert p.copy == Rect(50, 0, 200, 200)
    assert (p.canvas, p.paste_x, p.paste_y) == (200, 0, 0)
    assert p.upload == 200  # never upscaled


def test_center_crop_of_a_portrait_selection_on_an_offset_layer() -> None:
    # Layer at (10,20); selection 60 wide x 100 high starting at image (30,40).
    p = make_plan(10, 20, 500, 500, (30, 40, 90, 140), "selection-or-center-crop", "512x512")
    assert p.region == Rect(30, 40, 60, 100)
    assert p.cover == Rect(30, 60, 60, 60)
    assert p.copy == Rect(20, 40, 60, 60)  # layer coordinates
    assert p.upload == 60


def test_square_selection_is_used_as_is() -> None:
    p = make_plan(0, 0, 800, 600, (100, 100, 300, 300), "selection-or-center-crop", "1024x1024")
    assert p.cover == p.region == Rect(100, 100, 200, 200)


def test_pad_centres_the_region_on_a_square() -> None:
    p = make_plan(30, 40, 240, 160, (50, 60, 250, 160), "pad", "256x256")
    assert p.region == Rect(50, 60, 200, 100)
    assert p.copy == Rect(20, 20, 200, 100)
    assert (p.canvas, p.paste_x, p.paste_y) == (200, 0, 50)
    assert p.cover == Rect(50, 10, 200, 200)
    assert p.upload == 200


def test_pad_of_a_portrait_region_with_odd_padding() -> None:
    p = make_plan(0, 0, 101, 200, None, "pad", "256x256")
    assert (p.canvas, p.paste_x, p.paste_y) == (200, 49, 0)
    assert p.cover == Rect(-49, 0, 200, 200)


def test_stretch_keeps_the_region() -> None:
    p = make_plan(0, 0, 64, 48, None, "stretch", "256x256")
    assert p.cover == p.region == Rect(0, 0, 64, 48)
    assert p.copy == Rect(0, 0, 64, 48)
    assert p.canvas == 64 and p.upload == 64


@pytest.mark.parametrize("mode", vg_prepare.SQUARE_MODES)
@pytest.mark.parametrize(("size", "side"), [("256x256", 256), ("512x512", 512),
                                            ("1024x1024", 1024)])
def test_big_sources_are_downscaled_to_the_requested_size(mode: str, size: str,
                                                          side: int) -> None:
    p = make_plan(0, 0, 4000, 3000, None, mode, size)
    assert p.upload == side
    assert p.size == side


def test_stretch_scales_the_copy_once_straight_to_the_upload_size() -> None:
    # A long thin layer: the copy goes straight to 256x256, never to 16000x16000 first.
    p = make_plan(0, 0, 16000, 300, None, "stretch", "256x256")
    assert (p.copy, p.upload) == (Rect(0, 0, 16000, 300), 256)
    assert vg_prepare.upload_steps(p, p.upload) == vg_prepare.UploadSteps(
        scratch=256, layer_scale=(256, 256), paste_x=0, paste_y=0, image_scale=None)
    # A smaller retry (the PNG was too big) and a small source (never upscaled as a whole:
    # 64x48 goes up at 64x64) follow the same single step.
    assert vg_prepare.upload_steps(p, 179).layer_scale == (179, 179)
    small = make_plan(5, 7, 64, 48, None, "stretch", "256x256")
    assert vg_prepare.upload_steps(small, small.upload) == vg_prepare.UploadSteps(
        64, (64, 64), 0, 0, None)


def test_crop_and_pad_steps_place_the_copy_then_scale_the_square() -> None:
    p = make_plan(30, 40, 240, 160, (50, 60, 250, 160), "pad", "256x256")
    assert vg_prepare.upload_steps(p, 200) == vg_prepare.UploadSteps(200, None, 0, 50, None)
    assert vg_prepare.upload_steps(p, 140) == vg_prepare.UploadSteps(200, None, 0, 50, 140)
    p = make_plan(0, 0, 4000, 3000, None, "selection-or-center-crop", "512x512")
    assert vg_prepare.upload_steps(p, 512) == vg_prepare.UploadSteps(3000, None, 0, 0, 512)


def test_bad_mode_and_size_are_sentences() -> None:
    with pytest.raises(PrepareError, match="Unknown square mode"):
        make_plan(0, 0, 10, 10, None, "zoom", "256x256")
    with pytest.raises(PrepareError, match="256x256, 512x512, 1024x1024"):
        make_plan(0, 0, 10, 10, None, "pad", "300x300")


def test_smaller_upload_shrinks() -> None:
    assert vg_prepare.smaller_upload(1024) == 716
    assert vg_prepare.smaller_upload(1) == 1


# ------------------------------------------------------------------ placement


def test_unscaled_results_are_centred_on_the_region() -> None:
    p = make_plan(0, 0, 300, 200, None, "selection-or-center-crop", "256x256")
    assert place(p, 256, 256, False) == Placement(256, 256, None, 22, -28)
    p = make_plan(30, 40, 240, 160, (50, 60, 250, 160), "pad", "256x256")
    assert place(p, 256, 256, False) == Placement(256, 256, None, 22, -18)


def test_scaled_crop_results_cover_the_crop_square() -> None:
    p = make_plan(0, 0, 120, 90, None, "selection-or-center-crop", "512x512")
    pl = place(p, 512, 512, True)
    assert pl == Placement(90, 90, None, 15, 0)
    assert (pl.width, pl.height) == (90, 90)


def test_scaled_pad_results_lose_their_padding() -> None:
    p = make_plan(30, 40, 240, 160, (50, 60, 250, 160), "pad", "256x256")
    pl = place(p, 256, 256, True)
    assert pl == Placement(200, 200, Rect(0, 50, 200, 100), 50, 60)
    assert (pl.width, pl.height) == (200, 100)


def test_scaled_stretch_results_are_unstretched() -> None:
    p = make_plan(5, 7, 64, 48, None, "stretch", "256x256")
    assert place(p, 256, 256, True) == Placement(64, 48, None, 5, 7)


def test_empty_result_is_refused() -> None:
    p = make_plan(0, 0, 10, 10, None, "pad", "256x256")
    with pytest.raises(PrepareError):
        place(p, 0, 256, True)


# ------------------------------------------------------------------ settings


def test_settings_file_is_written_0600_and_read_back(tmp_path: Path) -> None:
    path = vg_settings.save(str(tmp_path / "gimp"), " http://gw:8080 ", " tok-123 ", 90)
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    assert json.loads(Path(path).read_text()) == {"url": "http://gw:8080", "token": "tok-123",
                                                  "timeout": 90.0}
    s = vg_settings.load(str(tmp_path / "gimp"), {})
    assert (s.url, s.token, s.timeout, s.from_env) == ("http://gw:8080", "tok-123", 90.0, set())
    # Re-saving keeps 0600 even when the file had been loosened.
    Path(path).chmod(0o644)
    vg_settings.save(str(tmp_path / "gimp"), "http://gw:8080", "tok-456")
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    assert not [p for p in (tmp_path / "gimp").iterdir() if p.name != vg_settings.FILE_NAME]


def test_environment_wins_key_by_key(tmp_path: Path) -> None:
    vg_settings.save(str(tmp_path), "http://file:1", "file-token", 30)
    s = vg_settings.load(str(tmp_path), {vg_settings.ENV_TOKEN: "env-token"})
    assert (s.url, s.token, s.timeout) == ("http://file:1", "env-token", 30.0)
    assert s.from_env == {"token"}
    s = vg_settings.load(str(tmp_path), {vg_settings.ENV_URL: "http://env:2",
                                         vg_settings.ENV_TIMEOUT: "5"})
    assert (s.url, s.token, s.timeout) == ("http://env:2", "file-token", 5.0)


def test_saving_never_writes_values_that_come_from_the_environment(tmp_path: Path) -> None:
    vg_settings.save(str(tmp_path), "http://file:1", "file-token", 30)
    env = {vg_settings.ENV_TOKEN: "env-secret-token", vg_settings.ENV_URL: "http://env:2"}
    # The dialog shows the settings in force (greyed where the environment sets them) and
    # Save hands every field back, the timeout changed by the user.
    s = vg_settings.load(str(tmp_path), env)
    assert s.from_env == {"token", "url"}
    path = vg_settings.save(str(tmp_path), s.url, s.token, 45, from_env=s.from_env)
    text = Path(path).read_text()
    assert "env-secret-token" not in text and "http://env:2" not in text
    assert json.loads(text) == {"url": "http://file:1", "token": "file-token", "timeout": 45.0}
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o600
    # Without the environment, the file's own values are in force again.
    s = vg_settings.load(str(tmp_path), {})
    assert (s.url, s.token, s.timeout) == ("http://file:1", "file-token", 45.0)


def test_saving_with_an_environment_token_and_no_file_leaves_the_token_out(
        tmp_path: Path) -> None:
    env = {vg_settings.ENV_TOKEN: "env-secret-token", vg_settings.ENV_TIMEOUT: "7"}
    s = vg_settings.load(str(tmp_path), env)
    path = vg_settings.save(str(tmp_path), "http://typed:3", s.token, s.timeout,
                            from_env=s.from_env)
    assert json.loads(Path(path).read_text()) == {"url": "http://typed:3"}
    s = vg_settings.load(str(tmp_path), {})
    assert (s.url, s.token, s.timeout) == ("http://typed:3", "", vg_settings.DEFAULT_TIMEOUT)
    # Every key from the environment: the file is left as it was.
    vg_settings.save(str(tmp_path), "http://file:1", "file-token", 30)
    before = Path(path).read_text()
    vg_settings.save(str(tmp_path), "http://env:2", "env-secret-token", 7,
                     from_env={"url", "token", "timeout"})
    assert json.loads(Path(path).read_text()) == json.loads(before)


def test_ca_file_is_saved_read_back_and_overridden_by_the_environment(
        tmp_path: Path) -> None:
    """Issue 19 #8: the studio CA file is a setting beside the URL and token."""
    path = vg_settings.save(str(tmp_path), "https://gw:8443", "tok", 30,
                            ca_file=" /etc/studio/ca.pem ")
    assert json.loads(Path(path).read_text())["ca_file"] == "/etc/studio/ca.pem"
    s = vg_settings.load(str(tmp_path), {})
    assert (s.ca_file, s.from_env) == ("/etc/studio/ca.pem", set())
    s = vg_settings.load(str(tmp_path), {vg_settings.ENV_CA_FILE: "/env/ca.pem"})
    assert (s.ca_file, s.from_env) == ("/env/ca.pem", {"ca_file"})
    # Saved from the dialog with the environment in force: the file keeps its own value.
    vg_settings.save(str(tmp_path), s.url, s.token, 30, ca_file=s.ca_file,
                     from_env=s.from_env)
    assert json.loads(Path(path).read_text())["ca_file"] == "/etc/studio/ca.pem"
    # Cleared in the dialog: gone from the file, the OS trust store alone applies.
    vg_settings.save(str(tmp_path), "https://gw:8443", "tok", 30, ca_file="")
    assert "ca_file" not in json.loads(Path(path).read_text())
    assert vg_settings.load(str(tmp_path), {}).ca_file == ""

def test_defaults_without_file(tmp_path: Path) -> None:
    s = vg_settings.load(str(tmp_path / "none"), {})
    assert (s.url, s.token) == (vg_settings.DEFAULT_URL, "")
    assert s.masked_token() == "(none)"


def test_broken_settings_file_is_a_sentence(tmp_path: Path) -> None:
    (tmp_path / vg_settings.FILE_NAME).write_text("{not json")
    with pytest.raises(vg_settings.SettingsError, match="Could not read the Generate "
                                                        "Variations settings file"):
        vg_settings.load(str(tmp_path), {})
    with pytest.raises(vg_settings.SettingsError, match="between 1 and 3600"):
        vg_settings.save(str(tmp_path), "u", "t", 0)


def test_token_mask_never_shows_the_whole_token() -> None:
    assert vg_settings.mask("abcdefghijklmnop") == "abc...mnop"
    assert vg_settings.mask("short") == "*****"
