"""The OpenAPI document is the server's contract (serving/contract.py): a request it allows is one
the server accepts, a request it forbids is refused, every answer is a documented status with its
body. Pinned by the unit checks below and by schemathesis (`--checks all`) against the served app."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from test_serve import free_port, served_config

# small limits, so every request schemathesis finds acceptable draws in a moment
LIMITS = {"max_frames": 2, "max_steps": 2, "max_caption_chars": 40, "max_reference_images": 0}
EXAMPLES = 50  # per operation in the fuzzing phase: 100 gave 591 cases, all passed, in 71 s on the 2-core VM
MAX_TIME_S = 240


def test_the_caption_pattern_is_the_servers_caption_rule():
    """The schema's caption pattern accepts exactly the captions the server's check accepts."""
    from serving.api import RequestError, _check_captions
    from serving.contract import caption_pattern
    from storygpt.config import ServeLimits

    limits = ServeLimits(max_frames=1, max_caption_chars=1000, max_steps=1, max_guidance=1, max_reference_images=0,
                         max_image_bytes=1, max_image_side=1)
    pattern = re.compile(caption_pattern())
    pool = ["a", "Z", "é", "中", " ", "\t", "\n", "\u00a0", "\u3000", "\u200b", "\u200d", "\ufeff", "\u00ad", "\x00",
            "\x1b", "\x85", "\U000e0001", "\U0001f600", "\U00020000", "\U000f0000"]  # lone surrogates: below
    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        caption = "".join(rng.choice(pool) for _ in range(rng.randint(0, 4)))
        try:
            _check_captions([caption], 0, limits)
            accepted = True
        except RequestError:
            accepted = False
        assert bool(pattern.match(caption)) == accepted, repr(caption)
        checked += accepted
    assert 100 < checked < 2900  # both sides were exercised
    with pytest.raises(RequestError, match="surrogate"):  # refused by the server, outside the pattern (see there)
        _check_captions(["Emma \ud800 waves"], 0, limits)


def test_the_scanned_code_points_hold_every_control_format_and_space_character():
    from serving.contract import CODE_POINTS

    scanned = set(CODE_POINTS)
    missed = [c for c in range(sys.maxunicode + 1) if c not in scanned
              and (unicodedata.category(chr(c)) in ("Cc", "Cs", "Cf") or chr(c).isspace())]
    assert missed == []


def test_limits_statuses_and_security_come_from_the_served_config(repo):
    from serving.contract import contract
    from serving.ingress import app
    from storygpt.config import load_config

    cfg = load_config(repo / "configs" / "tiny.yaml")
    limits = cfg.serve.limits
    plain = app.openapi()
    open_doc = contract(plain, limits, ["Emma", "Bruno"], api_key_required=False)
    keyed = contract(plain, limits, ["Emma", "Bruno"], api_key_required=True)
    story = open_doc["components"]["schemas"]["StoryRequest"]["properties"]
    assert story["captions"]["maxItems"] == limits.max_frames
    assert story["captions"]["items"]["maxLength"] == limits.max_caption_chars
    assert story["steps"]["anyOf"][0]["maximum"] == limits.max_steps
    assert story["reference_images"]["anyOf"][0]["propertyNames"] == {"enum": ["Emma", "Bruno"]}
    branches = open_doc["components"]["schemas"]["ContinueRequest"]["anyOf"]
    assert [(b["properties"]["captions"]["maxItems"], b["properties"]["k"]["maximum"]) for b in branches][:2] == [
        (1, limits.max_frames - 1), (2, limits.max_frames - 2)]
    post = open_doc["paths"]["/v1/stories"]["post"]["responses"]
    assert {"200", "400", "408", "413", "422", "500", "503"} <= set(post) and "401" not in post
    assert "Retry-After" in post["503"]["headers"]
    assert "security" not in open_doc["paths"]["/v1/stories"]["post"] and "securitySchemes" not in open_doc["components"]
    assert "401" in keyed["paths"]["/v1/stories"]["post"]["responses"] and "securitySchemes" in keyed["components"]
    assert "HTTPValidationError" not in json.dumps(open_doc)  # every error is the one documented shape


@pytest.fixture(scope="module")
def contract_server(ray_local, repo, tiny_work, tmp_path_factory):
    from ray import serve

    from serving.app import build_app
    from serving.command import start

    cfg = served_config(repo, tiny_work, tmp_path_factory.mktemp("contract-work"),
                        [f"serve.limits.{k}={v}" for k, v in LIMITS.items()])
    url = start(build_app(cfg), "127.0.0.1", free_port(), ray_init=False)
    yield url
    serve.shutdown()


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_the_served_app(contract_server, tmp_path):
    """Every check schemathesis has, on every operation, generated and negative data alike."""
    import requests

    doc = requests.get(contract_server + "/openapi.json", timeout=10).json()
    assert doc["components"]["schemas"]["StoryRequest"]["properties"]["captions"]["maxItems"] == LIMITS["max_frames"]
    st = Path(sys.executable).with_name("st")
    command = [str(st), "run", contract_server + "/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
               "--max-time", str(MAX_TIME_S), "--seed", "1", "--request-timeout", "60", "--workers", "1",
               "--generation-database", "none", "--no-color", "--report", "junit", "--report-dir", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=MAX_TIME_S + 120,
                         cwd=tmp_path)  # its caches stay out of the checkout
    print(run.stdout[-4000:])
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* passed\b|\bpassed\b", run.stdout), run.stdout[-2000:]
