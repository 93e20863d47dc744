"""Captioning: source passthrough, and a real VLM (tiny, random, saved to tmp and loaded back
through from_pretrained) running as a Ray actor pool on real mp4 clips."""

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.curation.caption import (CaptionConfig, VLMCaptioner, caption_clips, decode_clip,
                              frame_hw, resolve_num_gpus, sample_indices, vlm_kwargs)

NUM_FRAMES, FRAME_SIZE = 4, 56


def clip(source_id, start, end, abs_path, caption="", fps=8.0):
    return {"clip_id": f"{source_id}-{start:06d}-{end:06d}", "source_id": source_id,
            "path": f"videos/{source_id}.mp4", "abs_path": str(abs_path), "start": start,
            "end": end, "fps": fps, "width": 64, "height": 64, "caption": caption,
            "scores": {"motion": 1.0}, "source": {}}


# ----- pure functions -----------------------------------------------------------------------
def test_sample_indices_spread_over_the_span_and_repeat_when_short():
    assert sample_indices(10, 18, 4) == [11, 13, 15, 17]
    assert sample_indices(0, 2, 4) == [0, 0, 1, 1]  # a short clip still gives num_frames
    assert sample_indices(5, 6, 3) == [5, 5, 5]


def test_frame_hw_keeps_aspect_with_even_sides():
    assert frame_hw(1920, 1080, 336) == (336, 598)
    assert frame_hw(64, 64, 56) == (56, 56)
    assert frame_hw(480, 640, 100) == (134, 100)  # portrait


def test_num_gpus_auto_follows_the_cluster():
    assert resolve_num_gpus(None, {"CPU": 2.0, "memory": 1e9}) == 0
    assert resolve_num_gpus(None, {"CPU": 64.0, "GPU": 8.0}) == 1
    assert resolve_num_gpus(0.5, {"CPU": 64.0, "GPU": 8.0}) == 0.5  # as configured
    assert resolve_num_gpus(0, {"CPU": 64.0, "GPU": 8.0}) == 0


def test_model_actor_pools_never_ask_for_more_gpus_than_the_cluster_has():
    from pipeline.curation.parts import actor_pool

    gpus8 = {"CPU": 512.0, "GPU": 8.0}
    assert actor_pool(64, None, gpus8) == (8, 1.0)  # capped: 64 actors would wait forever
    assert actor_pool(None, None, gpus8) == (8, 1.0)  # default: one per GPU
    assert actor_pool(3, None, gpus8) == (3, 1.0)
    assert actor_pool(None, 0.5, gpus8) == (16, 0.5)
    assert actor_pool(None, None, {"CPU": 2.0}) == (1, 0.0)  # CPU: one actor unless asked
    assert actor_pool(4, None, {"CPU": 2.0}) == (4, 0.0)
    with pytest.raises(ValueError, match="embed.num_gpus=1 per actor, but the cluster has 0"):
        actor_pool(None, 1, {"CPU": 2.0}, "embed")
    with pytest.raises(ValueError, match="caption.concurrency"):
        actor_pool(0, None, gpus8, "caption")


def test_num_gpus_is_zero_on_this_cpu_machine(ray_with_state_api):
    import ray

    assert resolve_num_gpus(CaptionConfig().num_gpus, ray.cluster_resources()) == 0


# ----- source / none ------------------------------------------------------------------------
def test_source_passthrough_keeps_captions_and_marks_the_captioner():
    clips = [clip("a", 0, 8, "/x/a.mp4", "a red circle"), clip("b", 0, 8, "/x/b.mp4", ""),
             {**clip("c", 0, 8, "/x/c.mp4", "a cat"), "source": {"caption_origin": "sidecar"}}]
    kept, rejects = caption_clips(clips, CaptionConfig(kind="source"), origin="synthetic")
    assert rejects == []
    assert [c["caption"] for c in kept] == ["a red circle", "", "a cat"]
    # where each caption came from: the clip's own origin, else the default; none when empty
    assert [c["caption_source"] for c in kept] == ["source:synthetic", "source:none",
                                                   "source:sidecar"]
    assert [c["source_caption"] for c in kept] == ["a red circle", "", "a cat"]
    assert kept[0]["scores"] == clips[0]["scores"] and "caption_source" not in clips[0]

    kept, _ = caption_clips(clips, CaptionConfig(kind="none", keep_source_caption=False))
    assert [(c["caption"], c["caption_source"]) for c in kept] == [("", "none")] * 3
    assert "source_caption" not in kept[0]
    with pytest.raises(ValueError, match="caption.kind"):
        caption_clips(clips, CaptionConfig(kind="blip"))


# ----- the VLM ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from vlm_fixture import save_tiny_vlm

    return str(save_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three good clips from two real mp4s, one clip of a missing file, one of a corrupt one."""
    from data.synthetic import SourceConfig, generate

    root = tmp_path_factory.mktemp("src")
    rows = generate(SourceConfig(num_videos=2, seconds=2.0, bad_fraction=0.0,
                                 multishot_fraction=0.0), root)
    a, b = (root / r["path"] for r in rows)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return [clip("a", 0, 8, a, rows[0]["caption"]), clip("a", 8, 16, a, rows[0]["caption"]),
            clip("missing", 0, 8, root / "missing.mp4"), clip("b", 0, 16, b, rows[1]["caption"]),
            clip("corrupt", 0, 8, root / "corrupt.mp4")]


def vlm_cfg(model: str) -> CaptionConfig:
    return CaptionConfig(kind="vlm", model=model, num_frames=NUM_FRAMES, frame_size=FRAME_SIZE,
                         max_new_tokens=6, batch_size=2, concurrency=1)


@pytest.fixture(scope="module")
def captioner(tiny_vlm):
    """The captioner in this process, loaded through the same from_pretrained path."""
    return VLMCaptioner(**vlm_kwargs(vlm_cfg(tiny_vlm)))


def as_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
    batch["i"] = np.array([r["i"] for r in rows])
    return batch


def test_vlm_captions_on_a_ray_actor_pool(ray_with_state_api, tiny_vlm, clips, captioner, one_thread,
                                          tmp_path):
    logs = []
    cfg = replace(vlm_cfg(tiny_vlm), group_size=2)  # 3 parts: [a, a], [missing, b], [corrupt]
    kept, rejects = caption_clips(clips, cfg, log=logs.append, out_dir=tmp_path)

    # the good clips, in input order, each with a caption and its captioner
    assert [c["clip_id"] for c in kept] == [clips[k]["clip_id"] for k in (0, 1, 3)]
    assert all(isinstance(c["caption"], str) and c["caption"] for c in kept)
    names = {c["caption_source"] for c in kept}
    assert len(names) == 1 and names.pop().startswith("vlm:tiny-qwen@")
    assert [c["source_caption"] for c in kept] == [clips[k]["caption"] for k in (0, 1, 3)]
    assert len({c["caption"] for c in kept}) > 1  # the frames reach the model
    # the bad files end as rejects with the reason; the others are unaffected
    assert [(r["source_id"], r["stage"], r["reason"]) for r in rejects] == [
        ("missing", "caption", "caption_failed"), ("corrupt", "caption", "caption_failed")]
    assert all("decode" in r["detail"] and r["start"] == 0 for r in rejects)
    assert any("caption: 5/5 clips" in m for m in logs)

    # resumable: a rerun over the same parts captions only the group whose part is missing
    parts = sorted((tmp_path / "parts").glob("part-*.jsonl"))
    assert len(parts) == 3
    parts[1].unlink()  # as if the driver died with this group in flight
    before = {p.name: p.stat().st_mtime_ns for p in (parts[0], parts[2])}
    logs.clear()
    again = caption_clips(clips, cfg, log=logs.append, out_dir=tmp_path)
    assert again == (kept, rejects)
    assert any("2 of 3 parts already done, resuming" in m for m in logs)
    assert any("caption: 2/2 clips" in m for m in logs)  # the one missing group only
    assert {n: (tmp_path / "parts" / n).stat().st_mtime_ns for n in before} == before

    # greedy decoding: the same captions in this process, from a fresh load, one clip at a time
    for k, c in zip((0, 1, 3), kept):
        row = decode_clip({"i": k, "clip": json.dumps(clips[k])}, NUM_FRAMES, FRAME_SIZE)
        out = captioner(as_batch([row]))
        assert out["caption"][0] == c["caption"] and out["captioner"][0] == c["caption_source"]


def test_a_failing_clip_fails_alone_in_its_batch(clips, captioner, one_thread):
    cap = captioner
    bad = {**clips[0], "fps": 0.0}  # broken metadata: the caption call raises for this clip
    rows = [decode_clip({"i": k, "clip": json.dumps(c)}, NUM_FRAMES, FRAME_SIZE)
            for k, c in enumerate([clips[0], bad, clips[3], clips[2]])]
    out = cap(as_batch(rows))
    assert list(out["i"]) == [0, 1, 2, 3]
    assert out["caption"][0] and out["caption"][2] and not out["caption"][1]
    assert out["error"][0] == out["error"][2] == ""
    assert "ZeroDivisionError" in out["error"][1]
    assert out["error"][3].startswith("decode:")  # the missing file's decode error passes through
    solo = cap(as_batch(rows[:1]))
    assert solo["caption"][0] == out["caption"][0]  # batch-mates don't change a caption
