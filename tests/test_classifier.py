"""The frame classifier behind Char-Acc / Char-F1 and BG-Acc / BG-F1: the scores on hand-made cases,
fine-tuning on a preprocessed story world (held-out frames beat the untrained model and the
majority baselines), save / load, ImageNet weights read with ``weights_only=True``, the CLI."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storygpt.config import ConfigError, load_config
from storygpt.data.characters import WORLD
from storygpt.evaluation.scores import character_scores, predicted_setting_scores, setting_scores

# The classifier's training in these tests: 60 steps of batch 16 at 75 px (~26 s of one core; 80
# steps, ~35 s, score a little higher) on a 40-story world (120 train / 40 val / 40 test frames).
# The `records` fixture's 10-story world (30 train frames) is memorised, not generalised from
# (train Char-Acc 1.0, held-out 0.0-0.1 after 100 steps).
TRAIN = ["evaluate.classifier.max_steps=60", "evaluate.classifier.batch_size=16",
         "evaluate.classifier.learning_rate=2e-3", "evaluate.classifier.image_size=75"]


# ----------------------------------------------------------------------------- scores
def test_character_scores_are_exact_set_match_and_micro_f1():
    pred = [{"Ada"}, {"Ada", "Bruno"}, set(), {"Cleo"}]
    true = [{"Ada"}, {"Ada"}, set(), {"Dario"}]
    # exact match: frames 0 and 2 (an empty frame predicted empty is right) -> 2 / 4
    # TP = 1 + 1 + 0 + 0 = 2, FP = 0 + 1 + 0 + 1 = 2 (Bruno, Cleo), FN = 1 (Dario): F1 = 4 / (4 + 2 + 1)
    scores = character_scores(pred, true)
    assert scores == {"acc": 0.5, "f1": pytest.approx(4 / 7)}
    names = ["Ada", "Bruno", "Cleo", "Dario"]
    hot = lambda sets: np.array([[float(n in s) for n in names] for s in sets])  # noqa: E731
    assert character_scores(hot(pred), hot(true)) == scores  # multi-hot rows score the same
    assert character_scores([["Bruno", "Ada"]], [("Ada", "Bruno")]) == {"acc": 1.0, "f1": 1.0}  # order-free
    assert character_scores([["Ada", "Bruno"]], [["Ada"]]) == {"acc": 0.0, "f1": pytest.approx(2 / 3)}  # partial
    assert character_scores([[]], [[]]) == {"acc": 1.0, "f1": 1.0}  # nothing to find, nothing claimed
    assert character_scores([[]], [["Ada"]]) == {"acc": 0.0, "f1": 0.0}
    with pytest.raises(ValueError, match="frames"):
        character_scores([["Ada"]], [])
    with pytest.raises(ValueError, match="string"):
        character_scores(["Ada"], [["Ada"]])


def test_table_1_setting_scores_are_the_reference_scripts_exact_set_match_and_micro_f1():
    pred = [["beach"], ["beach", "forest"], [], ["cave"]]
    true = ["beach", "forest", "forest", "cave"]
    # exact match: frames 0 and 3 (frame 1 also claims 'beach'; frame 2 abstains) -> 2 / 4
    # micro: TP 3 (beach, forest, cave), FP 1 (the extra beach), FN 1 (frame 2) -> 6 / 8
    assert predicted_setting_scores(pred, true) == {"acc": 0.5, "f1": pytest.approx(0.75)}
    assert predicted_setting_scores([["cave"], ["x"]], ["cave", None]) == {"acc": 1.0, "f1": 1.0}  # unlabelled
    with pytest.raises(ValueError, match="true frames"):
        predicted_setting_scores([["cave"]], [])


def test_setting_scores_are_accuracy_and_macro_f1_with_micro_on_request():
    pred = ["beach", "beach", "beach", "cave", None]
    true = ["beach", "forest", "forest", "cave", "cave"]
    # accuracy: frames 0 and 3 -> 2 / 5. Per setting F1 = 2TP / (2TP + FP + FN):
    # beach 2 / (2 + 2 + 0) = 1/2, forest 0, cave 2 / (2 + 0 + 1) = 2/3 -> macro 7/18
    assert setting_scores(pred, true) == {"acc": 0.4, "f1": pytest.approx(7 / 18)}
    # micro: TP 2, FP 2 (the two wrong 'beach'), FN 3 (the abstention claims nothing) -> 4 / 9
    assert setting_scores(pred, true, average="micro") == {"acc": 0.4, "f1": pytest.approx(4 / 9)}
    # one argmax label per frame: micro F1 is accuracy (why macro is the default)
    full = ["beach", "beach", "beach", "cave", "beach"]
    assert setting_scores(full, true, average="micro")["f1"] == pytest.approx(setting_scores(full, true)["acc"])
    assert setting_scores(["beach", "cave", "cave"], ["beach", None, ""]) == {"acc": 1.0, "f1": 1.0}  # unlabelled
    with pytest.raises(ValueError):
        setting_scores([None], [None])


# ----------------------------------------------------------------------------- ImageNet weights
@pytest.fixture(scope="module")
def imagenet_state():
    """A random Inception-v3 state dict in torchvision's full layout (1000-way fc, aux head): what
    `evaluate.classifier.weights` names on the real presets."""
    from torchvision.models import inception_v3

    torch.manual_seed(1)
    return inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict()


_UNPICKLED: list[str] = []


def _ran_on_unpickle():
    _UNPICKLED.append("code ran")


class _Payload:
    def __reduce__(self):
        return (_ran_on_unpickle, ())


def test_imagenet_weights_load_into_the_trunk_with_weights_only(imagenet_state, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from storygpt.evaluation.classifier import FrameClassifier

    reference = imagenet_state
    torch.save(reference, tmp_path / "inception.pth")
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real_load(*a, **k))

    model = FrameClassifier(WORLD.names, ["beach", "cave"], 75)
    head_before = model.character_head.weight.clone()
    info = model.load_imagenet_weights(tmp_path / "inception.pth")
    assert seen == [True]
    trunk = model.trunk.state_dict()
    assert info["loaded"] == len(trunk) == len([k for k in reference if not k.startswith(("fc.", "AuxLogits."))])
    assert all(torch.equal(trunk[k], v) for k, v in reference.items() if not k.startswith(("fc.", "AuxLogits.")))
    assert "fc.weight" in info["skipped"] and any(k.startswith("AuxLogits.") for k in info["skipped"])
    assert torch.equal(model.character_head.weight, head_before)  # the new heads are not touched

    # the same from safetensors, here without BatchNorm's step counters (as in old checkpoints)
    other = FrameClassifier(WORLD.names, [], 75, init_weights=False)
    save_file({k: v.contiguous() for k, v in reference.items() if not k.endswith("num_batches_tracked")},
              str(tmp_path / "inception.safetensors"))
    other.load_imagenet_weights(tmp_path / "inception.safetensors")
    other_trunk = other.trunk.state_dict()
    assert all(torch.equal(other_trunk[k], trunk[k]) for k in trunk if not k.endswith("num_batches_tracked"))

    # a pickle that would run code is refused, and the code never runs
    torch.save({"Conv2d_1a_3x3.conv.weight": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="evaluate.classifier.weights"):
        model.load_imagenet_weights(tmp_path / "evil.pth")
    assert _UNPICKLED == []
    # not an Inception-v3, and a missing file: errors that name the key
    torch.save({k: reference[k] for k in list(reference)[:6]}, tmp_path / "partial.pth")  # most keys missing
    with pytest.raises(ConfigError, match="evaluate.classifier.weights: .* not a torchvision Inception-v3"):
        model.load_imagenet_weights(tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="evaluate.classifier.weights: expected an existing"):
        model.load_imagenet_weights(tmp_path / "missing.pth")


def test_train_classifier_names_a_missing_weights_file_before_reading_data(repo, tmp_path):
    from storygpt.evaluation.classifier_training import train_classifier

    cfg = load_config(repo / "configs" / "tiny.yaml",
                      [f"work_dir={tmp_path}", f"evaluate.classifier.weights={tmp_path}/nope.pth"])
    with pytest.raises(ConfigError, match="evaluate.classifier.weights: .*nope.pth"):
        train_classifier(cfg, tmp_path / "no-records")


# ----------------------------------------------------------------------------- training (slow)
@pytest.fixture(scope="module")
def world_records(ray_local, tiny_work, repo, tmp_path_factory):
    """A 40-story world (seed 11; 20 % val, 20 % test) preprocessed into records on the local Ray."""
    from preprocessing.job import preprocess
    from storygpt.world.generate import generate_world

    root = tmp_path_factory.mktemp("classifier_world")
    generate_world(root / "world", stories=40, seed=11, image_size=128, clip_frames=2,
                   val_fraction=0.2, test_fraction=0.2)
    # 64 px records, where the margins below were measured: at the quickstart's 32 px the trained
    # classifier's held-out Char-Acc was 0.225 against the majority's 0.04 (README, Evaluate)
    preprocess(load_config(repo / "configs" / "tiny.yaml", [f"work_dir={tiny_work}", f"data.root={root / 'world'}",
                                                           f"preprocess.output={root / 'records'}", "char_ldm.resolution=64"]))
    return root / "records"


@pytest.fixture(scope="module")
def trained(world_records, repo, tmp_path_factory):
    from storygpt.evaluation.classifier_training import train_classifier

    work = tmp_path_factory.mktemp("classifier_work")
    cfg = load_config(repo / "configs" / "tiny.yaml", [f"work_dir={work}", *TRAIN])
    return cfg, train_classifier(cfg, world_records)


@pytest.fixture(scope="module")
def frames(world_records):
    """split -> (decoded frames, character lists, settings) of the 40-story world's records."""
    from storygpt.data.record_schema import decode_png, read_table

    rows = read_table(world_records, columns=["split", "characters", "setting", "image"]).to_pylist()
    return {split: ([decode_png(r["image"]) for r in rows if r["split"] == split],
                    [r["characters"] for r in rows if r["split"] == split],
                    [r["setting"] for r in rows if r["split"] == split]) for split in ("train", "val", "test")}


@pytest.mark.slow
def test_training_beats_the_untrained_model_and_the_majority_baseline_on_held_out_frames(trained, frames):
    from storygpt.evaluation.classifier import FrameClassifier

    cfg, figures = trained
    assert figures["steps"] == 60 and figures["train_frames"] == 120 and figures["val_frames"] == 40
    assert figures["last_loss"] < 0.6 * figures["first_loss"]
    model = FrameClassifier.from_pretrained(figures["output"])
    assert model.characters == WORLD.names and len(model.settings) == figures["settings"] >= 8

    images, chars, settings = (a + b for a, b in zip(frames["val"], frames["test"]))  # 80 held-out frames
    torch.manual_seed(0)
    untrained = FrameClassifier(model.characters, model.settings, model.image_size)

    def scores(predictions, n=len(images)):
        pred_chars, pred_settings = predictions
        return {"char": character_scores(pred_chars[:n], chars[:n]),
                "bg": predicted_setting_scores(pred_settings[:n], settings[:n])}

    predicted = model.predict_labels(images)
    trained_scores, untrained_scores = scores(predicted), scores(untrained.predict_labels(images))
    # what train_classifier reported for the val split (the first 40) is what the saved model predicts
    val = scores(predicted, n=len(frames["val"][0]))
    assert {"val_char_acc": val["char"]["acc"], "val_char_f1": val["char"]["f1"], "val_bg_acc": val["bg"]["acc"],
            "val_bg_f1": val["bg"]["f1"]} == {k: figures[k] for k in ("val_char_acc", "val_char_f1", "val_bg_acc",
                                                                       "val_bg_f1")}
    _, train_chars, train_settings = frames["train"]
    majority_set = collections.Counter(tuple(sorted(c)) for c in train_chars).most_common(1)[0][0]
    majority = character_scores([majority_set] * len(chars), chars)
    majority_bg = predicted_setting_scores([[collections.Counter(train_settings).most_common(1)[0][0]]] * len(settings),
                                           settings)
    print(json.dumps({"trained": trained_scores, "untrained": untrained_scores, "majority_set": majority,
                      "majority_setting": majority_bg, "figures": figures}))
    # measured (80 held-out frames) on the world before episodes: trained Char-Acc 0.375, untrained
    # 0.0, majority set 0.04; BG-Acc trained 0.50, untrained 0.06, majority 0.03 (chance 0.1). The
    # episode world repeats an episode's cast, so its majority set is a stronger baseline (0.15),
    # and trained Char-Acc was 0.275 (2026-12-07). BG-Acc is now the reference script's exact match
    # of a thresholded sigmoid head, stricter than the argmax it was: 60 steps leave many frames
    # with no setting above 0.5. Measured 2026-12-07: BG-Acc trained 0.1625, untrained 0.0,
    # majority 0.0625 (chance 0.1); micro BG-F1 0.25 / 0.16 / 0.06
    assert trained_scores["char"]["acc"] >= max(untrained_scores["char"]["acc"], majority["acc"]) + 0.1
    assert trained_scores["char"]["f1"] >= max(untrained_scores["char"]["f1"], majority["f1"]) + 0.15
    assert trained_scores["bg"]["acc"] >= max(1 / len(model.settings) + 0.05, untrained_scores["bg"]["acc"] + 0.1,
                                              majority_bg["acc"] + 0.05)
    assert trained_scores["bg"]["f1"] >= max(untrained_scores["bg"]["f1"], majority_bg["f1"]) + 0.05


@pytest.mark.slow
def test_save_load_round_trip_gives_identical_predictions(trained, frames, tmp_path):
    from storygpt.evaluation.classifier import FrameClassifier

    _, figures = trained
    output = figures["output"]
    config = json.loads((Path(output) / "config.json").read_text())
    assert config["characters"] == WORLD.names and config["image_size"] == 75 and len(config["settings"]) > 0
    assert config["setting_head"] == "sigmoid"
    assert json.loads((Path(output) / "training.json").read_text())["steps"] == 60
    leftovers = [p.name for p in Path(output).parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temp dir was renamed into place

    images = frames["test"][0][:12]
    first = FrameClassifier.from_pretrained(output)
    first.save_pretrained(tmp_path / "copy")
    second = FrameClassifier.from_pretrained(tmp_path / "copy")
    for a, b in zip(first.predict(images), second.predict(images)):
        assert np.array_equal(a, b)
    features = first.features(images)
    assert features.shape == (12, 2048) and np.array_equal(features, second.features(images))
    char_probs, setting_probs, pooled = first.predict_with_features(images)  # one trunk pass: the same figures
    assert np.array_equal(pooled, features) and np.array_equal(char_probs, first.predict(images)[0])
    # batching and mixed input sizes do not change a frame's prediction (resized per frame to 75 px)
    big = np.kron(images[0], np.ones((2, 2, 1), np.uint8))  # the same frame at 128 px
    chars, _ = first.predict([images[1], big, images[2]], batch_size=2)
    assert np.allclose(chars[[0, 2]], first.predict([images[1], images[2]], batch_size=1)[0], atol=1e-5)
    names, settings = first.predict_labels(images[:3])
    assert all(set(n) <= set(WORLD.names) for n in names) and all(set(s) <= set(first.settings) for s in settings)
    # a classifier saved before the sigmoid setting head (no "setting_head" key) predicts its argmax
    del config["setting_head"]
    (tmp_path / "copy" / "config.json").write_text(json.dumps(config))
    old = FrameClassifier.from_pretrained(tmp_path / "copy")
    assert old.setting_activation == "softmax" and all(len(s) == 1 for s in old.predict_labels(images[:3])[1])
    with pytest.raises(ValueError, match="uint8"):
        first.predict([images[0].astype(np.float32)])


@pytest.mark.slow
def test_cli_trains_saves_and_reads_imagenet_weights(imagenet_state, world_records, frames, repo, tmp_path, capsys):
    from storygpt.cli import main
    from storygpt.evaluation.classifier import FrameClassifier

    torch.save(imagenet_state, tmp_path / "inception.pth")
    common = ["--config", str(repo / "configs" / "tiny.yaml"), "--set", f"work_dir={tmp_path}",
              "--set", "evaluate.classifier.max_steps=2"]
    assert main(["train-classifier", *common, "--records", str(tmp_path / "none")]) == 2
    assert "--records: expected a preprocessed records dir" in capsys.readouterr().err

    rc = main(["train-classifier", *common, "--records", str(world_records),
               "--set", f"evaluate.classifier.weights={tmp_path / 'inception.pth'}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["steps"] == 2 and summary["imagenet_weights"].endswith("inception.pth")
    assert summary["output"] == str(tmp_path / "classifier")
    model = FrameClassifier.from_pretrained(tmp_path / "classifier")
    assert model.predict(frames["val"][0][:2])[1].shape == (2, summary["settings"])
    # a second run replaces the first in place
    assert main(["train-classifier", *common, "--records", str(world_records)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["imagenet_weights"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier", "inception.pth"]
