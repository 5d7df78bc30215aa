"""Reliability round two (issue 28, items 4, 5, 6, 9, 10, 11, 13): bad inputs and hostile servers give a named
error or a counted, reported failure, never a silent wrong result, a leaked key or a traceback."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.test_eval_http import GOOD, RUBRIC, ChatServer, completion

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RawServer:
    """A loopback HTTP server whose handler is `respond(handler)`; records every request's method and auth."""

    def __init__(self, respond):
        self.requests: list[tuple[str, str | None]] = []
        self.sent = 0  # body bytes the handler managed to write
        server = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.requests.append((self.command, self.headers.get("Authorization")))
                try:
                    respond(self, server)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            do_GET = do_POST = handle_any

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def judge_at(url: str, timeout_s: float = 5.0):
    from eval.judge import OpenAIJudge

    return OpenAIJudge(url, "judge-model", "sk-secret-judge-key", 0.0, 42, timeout_s)


def ask_once(backend, max_attempts: int = 2):
    from eval.judge import Backoff, RateLimiter, RaterOutcome, ask

    return ask(backend, "user prompt", RUBRIC, RaterOutcome("i1", 0, "k"), max_attempts, RateLimiter(None),
               Backoff(0.0, 0.0))


# ---------------------------------------------------------------- 4. the key never follows a redirect


def test_a_judge_redirect_is_refused_and_the_key_never_reaches_the_other_origin():
    from eval.judge import FatalJudgeError, JudgeRedirectError

    def answer(handler, server):
        handler.send_response(200)
        body = completion(GOOD)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with RawServer(answer) as elsewhere:
        target = f"{elsewhere.origin}/v1/chat/completions"

        def redirect(handler, server):
            handler.send_response(302)
            handler.send_header("Location", target)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with RawServer(redirect) as judge_server:
            with pytest.raises(JudgeRedirectError, match=rf"HTTP 302 redirect to '{target}' refused") as caught:
                ask_once(judge_at(f"{judge_server.origin}/v1"))
    assert isinstance(caught.value, FatalJudgeError)  # every request would be redirected: the run stops
    assert judge_server.requests == [("POST", "Bearer sk-secret-judge-key")]
    assert elsewhere.requests == []  # neither the key nor anything else went there


# ---------------------------------------------------------------- 10. total deadline, bounded body, odd content


def test_the_judge_bounds_total_time_and_body_size_and_names_non_text_content(tmp_path):
    from eval.cache import JudgeCache
    from eval.judge import MAX_REPLY_BYTES, Backoff, JudgeJob, RateLimiter, ReplyTooLarge, run_judge

    def trickle(handler, server):  # one byte every 0.25 s, status line included, for up to 6 s
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(0.25)

    with RawServer(trickle) as slow:
        began = time.monotonic()
        outcome = ask_once(judge_at(f"{slow.origin}/v1", timeout_s=1.0), max_attempts=1)
        took = time.monotonic() - began
    assert outcome.rating is None and "timed out: no complete reply within 1 s" in outcome.transient_errors[0]
    assert took < 3.0  # the per-read timeout never fires on a trickle: only a total deadline stops it

    def endless(handler, server):  # no Content-Length: the body runs until the client hangs up
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        chunk = b" " * (1 << 20)
        while server.sent < 64 * MAX_REPLY_BYTES // 8:
            handler.wfile.write(chunk)
            server.sent += len(chunk)

    with RawServer(endless) as huge:
        outcome = ask_once(judge_at(f"{huge.origin}/v1"))
    assert outcome.attempts == 1 and outcome.error.endswith(f"reply exceeds {MAX_REPLY_BYTES} bytes")
    assert huge.sent < 3 * MAX_REPLY_BYTES  # the read stopped (socket buffers hold a little more)

    def declared(handler, server):
        handler.send_response(200)
        handler.send_header("Content-Length", str(200 << 20))
        handler.end_headers()

    with RawServer(declared) as big:
        with pytest.raises(ReplyTooLarge, match=rf"reply of {200 << 20} bytes exceeds {MAX_REPLY_BYTES} bytes"):
            judge_at(f"{big.origin}/v1").complete("s", "u")

    # content that is a number, a list or an object: a named failure of that item, the others are rated
    with ChatServer() as server:
        oddities = [completion(5), completion([{"type": "text", "text": GOOD}]), completion({"text": GOOD})]
        server.script = [(200, body, 0.0) for body in oddities for _ in range(2)]
        jobs = [JudgeJob(f"odd{i}", f"odd {i}", RUBRIC) for i in range(3)] + [JudgeJob("fine", "fine", RUBRIC)]
        backend = judge_at(server.url)
        backend.max_workers = 1  # the script is served in job order
        cache = JudgeCache(tmp_path / "cache.sqlite")
        result = run_judge(jobs, backend, cache, 1, {}, 2, RateLimiter(None), Backoff(0.0, 0.0), progress=False)
        cache.close()
    assert set(result.ratings) == {"fine"} and result.stats.failed_ratings == 3
    for item, kind in zip(("odd0", "odd1", "odd2"), ("int", "list", "dict")):
        assert f"malformed API response: message content is a {kind}, not a string" in result.failures[item]


# ---------------------------------------------------------------- 5. a damaged data cache is rebuilt, never trained on


def test_a_data_cache_part_missing_truncated_or_altered_is_named_and_rebuilt(synthetic_dir, processor, tmp_path, monkeypatch):
    from core.items import DataError
    from train import data_cache

    monkeypatch.setattr(data_cache, "MIN_RANGE_BYTES", 3000)  # the 24 records in several parts
    monkeypatch.setattr(data_cache, "MAX_RANGE_BYTES", 3000)
    train, root, lines = synthetic_dir / "train.jsonl", tmp_path / "cache", []

    def open_cache():
        return data_cache.cached_records(train, None, processor, "baseline", 30.0, root, 1, lines.append)

    expected = open_cache().data.to_pylist()
    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    parts = sorted(folder.glob("part-*.arrow"))
    info = json.loads((folder / "info.json").read_text())
    assert len(parts) > 3 and [p["name"] for p in info["parts"]] == [p.name for p in parts]
    assert sum(p["rows"] for p in info["parts"]) == info["records"] == 24

    def truncate(part):
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])

    def flip(part):  # same size, one character of the text changed
        data = bytearray(part.read_bytes())
        at = data.index(b"beep") if b"beep" in data else data.index(b"tone")
        data[at] ^= 0x20
        part.write_bytes(bytes(data))

    damages = [(lambda part: part.unlink(), "missing"), (truncate, "bytes, the manifest says"),
               (flip, "content differs from the manifest (blake2b)")]
    for damage, says in damages:
        lines.clear()
        damage(parts[1])
        assert open_cache().data.to_pylist() == expected  # all 24 rows, as built
        assert any(f"{parts[1]}: " in line and says in line and "rebuilding" in line for line in lines), lines[0]
        assert any("building" in line for line in lines) and not list(root.glob("*.tmp-*"))

    truncate(parts[2])  # read directly, a truncated part is an error naming it, not a bare OSError
    with pytest.raises(DataError, match=rf"{parts[2]}: unreadable data-cache part"):
        data_cache.load(folder)


# ---------------------------------------------------------------- 6. weights that do not match their config


def lora_adapter(checkpoint, out):
    """A small LoRA adapter for `checkpoint`, saved as training saves it."""
    from peft import LoraConfig, get_peft_model

    from core import qwen_omni as qo

    model = get_peft_model(qo.load_thinker(checkpoint, "float32"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.save_pretrained(str(out), save_embedding_layers=False)
    return out


def edit_safetensors(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_weights_that_do_not_match_their_config_fail_to_load_in_training_and_inference(
        tiny_checkpoint, synthetic_dir, tmp_path, capsys):
    import shutil

    import torch
    from safetensors import safe_open

    from core import qwen_omni as qo
    from infer.cli import main as infer_main
    from train import runtime, sft

    talking = shutil.copytree(tiny_checkpoint, tmp_path / "with-talker")  # a full Qwen3-Omni also has the speech parts
    index = json.loads((talking / qo.WEIGHT_INDEX).read_text())
    shard = sorted(talking.glob("model-*.safetensors"))[-1]
    extra = {"talker.model.norm.weight": torch.ones(4), "code2wav.pre_transformer.norm.weight": torch.ones(4)}
    edit_safetensors(shard, lambda tensors: tensors.update(extra))
    index["weight_map"].update({name: shard.name for name in extra})
    (talking / qo.WEIGHT_INDEX).write_text(json.dumps(index))
    qo.load_thinker(talking)  # skipped, as transformers and the ZeRO-3 loader skip them

    deeper = shutil.copytree(tiny_checkpoint, tmp_path / "deeper")
    config = json.loads((deeper / "config.json").read_text())
    layers = config["thinker_config"]["text_config"]["num_hidden_layers"]
    config["thinker_config"]["text_config"]["num_hidden_layers"] = layers + 1
    (deeper / "config.json").write_text(json.dumps(config))
    says = rf"{deeper}: the thinker's weights do not match its config.json: missing \d+ \(model.layers.{layers}.input_layernorm"

    meta = synthetic_dir / "test.jsonl"
    assert infer_main(["run", "recipes/tiny.yaml", f"model.path={deeper}", f"infer.meta={meta}", "infer.adapter=null",
                       f"infer.output={tmp_path / 'infer' / 'submission.jsonl'}", "infer.limit=2"]) == 2
    assert re.search(says, capsys.readouterr().err)
    assert runtime.cli(sft.main, ["recipes/tiny.yaml", f"model.path={deeper}", f"train.output_dir={tmp_path / 'run'}",
                                  f"data.train=[{{path: {synthetic_dir / 'train.jsonl'}}}]", "train.max_steps=1"]) == 2
    assert re.search(says, capsys.readouterr().err)

    # a LoRA adapter: one tensor missing, one that fits nothing (peft warns of the first, drops the second)
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        names = sorted(handle.keys())
    stray = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"

    def damage(tensors):
        tensors[stray] = tensors.pop(names[0])

    edit_safetensors(weights, damage)
    with pytest.raises(qo.CheckpointError, match=rf"{weights}: the adapter's tensors do not match the LoRA its "
                                                 rf"adapter_config.json places: missing 1 \({names[0]}\); unexpected 1 \({stray}\)"):
        qo.load_adapter(qo.load_thinker(tiny_checkpoint), adapter)


# ---------------------------------------------------------------- 13. truncated weights, a damaged judge cache, a hostile tarball


def test_truncated_weights_a_damaged_judge_cache_and_a_hostile_bundle_are_named_errors(tiny_checkpoint, tmp_path):
    import io
    import shutil
    import tarfile

    from audit.verify import opened
    from core import qwen_omni as qo
    from core.items import DataError
    from eval.cache import JudgeCache, JudgeCacheError

    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])

    copy = shutil.copytree(tiny_checkpoint, tmp_path / "model")
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    truncate(shard)
    with pytest.raises(qo.CheckpointError, match=rf"{shard}: [\d,]+ bytes, its header describes [\d,]+: truncated"):
        qo.load_thinker(copy)
    adapter = lora_adapter(tiny_checkpoint, tmp_path / "adapter")
    truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(qo.CheckpointError, match=rf"{adapter / 'adapter_model.safetensors'}: [\d,]+ bytes.*truncated"):
        qo.load_adapter(qo.load_thinker(tiny_checkpoint), adapter)

    # a judge cache: garbage from the first byte, then a real cache with a page overwritten
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database, " * 512)
    with pytest.raises(JudgeCacheError, match=rf"{garbage}: damaged judge cache .*sqlite3 {garbage} .recover"):
        JudgeCache(garbage)
    torn = tmp_path / "torn.sqlite"
    cache = JudgeCache(torn)
    for i in range(400):
        cache.put(f"k{i}", "m", f"item{i}", 0, {}, "reply " * 20, 1)
    cache.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache.close()
    data = bytearray(torn.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[3 * page : 4 * page] = b"\xff" * page  # one b-tree page of the table
    torn.write_bytes(bytes(data))
    with pytest.raises(JudgeCacheError, match=rf"{torn}: damaged judge cache"):
        JudgeCache(torn)
    assert torn.read_bytes() == bytes(data)  # left as it was, to recover from

    # a bundle tarball: each member that could leave the folder or is not a plain file is named and refused
    def tarball(name, member, payload=b""):
        path = tmp_path / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            folder = tarfile.TarInfo("bundle")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        return path

    def entry(name, kind=tarfile.REGTYPE, link=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, link
        return info

    hostile = {
        "dotdot": (entry("bundle/../../escaped.txt"), "a path leaving the extraction folder"),
        "absolute": (entry(str(tmp_path / "absolute.txt")), "an absolute path"),
        "symlink": (entry("bundle/MANIFEST.json", tarfile.SYMTYPE, "/etc/passwd"), "a symbolic link (to '/etc/passwd')"),
        "hardlink": (entry("bundle/copy", tarfile.LNKTYPE, "/etc/passwd"), "a hard link"),
        "device": (entry("bundle/null", tarfile.CHRTYPE), "a device, FIFO or other special file"),
    }
    for name, (member, why) in hostile.items():
        path = tarball(name, member, b"x" if member.isfile() else b"")
        with pytest.raises(DataError, match=re.escape(f"{path}: member {member.name!r}: {why}")):
            with opened(path):
                pass
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "absolute.txt").exists()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(tarball("fine", entry("bundle/a.txt"), b"abc").read_bytes()[:30])
    with pytest.raises(DataError, match=rf"{broken}: unreadable or refused archive"):
        with opened(broken):
            pass


# ---------------------------------------------------------------- 9. audio headers are checked before any decode


def test_an_absurd_audio_header_fails_its_item_before_any_decode_and_the_rest_is_answered(
        tiny_checkpoint, synthetic_dir, tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf

    from core import audio
    from core.items import DataError
    from infer.run import run
    from tests.test_reliability import infer_recipe

    one_hz, long = tmp_path / "one_hz.wav", tmp_path / "long.wav"
    sf.write(str(one_hz), np.zeros(500, dtype=np.float32), 1, subtype="PCM_16")  # 500 s at 1 Hz: 8M samples at 16 kHz
    sf.write(str(long), np.zeros(6 * 16000, dtype=np.float32), 16000, subtype="PCM_16")
    monkeypatch.setattr(audio, "MAX_AUDIO_SECONDS", 5.0)  # the real bound is an hour; a 6 s clip stands in
    with pytest.raises(audio.AudioError, match=rf"{one_hz}: header claims a sample rate of 1 Hz, outside 1,000-768,000 Hz"):
        audio.load_audio(one_hz)  # training's and the feature cache's path: refused before decoding
    with pytest.raises(audio.AudioError, match=rf"{long}: header claims 6 s of audio .* more than the 5 s a clip may hold"):
        audio.decode_audio(str(long), long)

    records = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()][:5]
    for record in records:
        record["audio_path"] = str(synthetic_dir / record["audio_path"])
    records[1]["audio_path"], records[3]["audio_path"] = str(one_hz), str(long)
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out" / "submission.jsonl"
    summary = run(infer_recipe(tiny_checkpoint, meta, out))
    ids = [r["id"] for r in records]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [ids[0], ids[2], ids[4]]
    failed = {f["id"]: f["error"] for f in json.loads(out.with_name("submission.run.json").read_text())["failed"]}
    assert summary["totals"]["failed"] == 2 and list(failed) == [ids[1], ids[3]]
    assert failed[ids[1]].startswith(f"{meta}:2 (id={ids[1]}): audio_path: {one_hz}: header claims a sample rate of 1 Hz")
    assert f"{meta}:4 (id={ids[3]}): audio_path: {long}: header claims 6 s" in failed[ids[3]]
    with pytest.raises(DataError, match=rf"{meta}:2 \(id={ids[1]}\): audio_path: .*1 Hz"):
        run(infer_recipe(tiny_checkpoint, meta, tmp_path / "strict" / "submission.jsonl", "infer.fail_fast=true"))


# ---------------------------------------------------------------- 11. lone surrogates: refused alike by inference, validate and scoring


def test_a_lone_surrogate_in_a_question_or_a_reasoning_is_refused_alike_by_infer_validate_and_scoring(
        synthetic_dir, tmp_path, capsys):
    from core.items import DataError, load_items
    from eval.__main__ import main as eval_main
    from eval.submission import SubmissionError, load_meta, load_submission
    from infer.cli import main as infer_main
    from infer.submission import validate_submission

    lines = (synthetic_dir / "test.jsonl").read_text().splitlines()[:3]
    records = [json.loads(line) for line in lines]
    for record in records:
        record["audio_path"] = str(synthetic_dir / record["audio_path"])
    ids = [r["id"] for r in records]
    good_meta = tmp_path / "meta.jsonl"
    good_meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    records[1]["question"] = "How many beeps \ud800?"  # json.dumps writes the escape \ud800, valid JSON
    bad_meta = tmp_path / "bad-meta.jsonl"
    bad_meta.write_text("".join(json.dumps(r) + "\n" for r in records))
    says = "question: holds a lone surrogate (U+D800) at character 16"

    with pytest.raises(DataError, match=re.escape(f"{bad_meta}:2 (id={ids[1]}): {says}")):
        load_items(bad_meta, check_audio=False)  # inference and training
    with pytest.raises(SubmissionError, match=re.escape(f"{bad_meta}:2 (id={ids[1]}): {says}")):
        load_meta(bad_meta)  # scoring
    assert infer_main(["run", "recipes/tiny.yaml", f"infer.meta={bad_meta}", f"infer.output={tmp_path / 'o' / 's.jsonl'}"]) == 2
    assert f"{bad_meta}:2 (id={ids[1]}): {says}" in capsys.readouterr().err

    submission = [{"id": rid, "thinking_prediction": "two beeps", "answer_prediction": r["answer"]}
                  for rid, r in zip(ids, records)]
    submission[2]["thinking_prediction"] = "I hear \udc80 beeps"
    sub = tmp_path / "submission.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in submission))
    says = f"{sub}:3 (id={ids[2]}): thinking_prediction: holds a lone surrogate (U+DC80) at character 8"
    errors, _ = validate_submission(sub, good_meta)
    assert len(errors) == 1 and errors[0].startswith(says)
    assert infer_main(["validate", str(sub), "--meta", str(good_meta)]) == 1
    assert says in capsys.readouterr().err
    with pytest.raises(SubmissionError, match=re.escape(says)):
        load_submission(sub)
    assert eval_main(["score", "recipes/tiny.yaml", f"eval.meta={good_meta}", f"eval.submission={sub}",
                      f"eval.report_dir={tmp_path / 'eval'}", "eval.judge.backend=none", "eval.charts=false"]) == 2
    assert says in capsys.readouterr().err

    # a surrogate in the id itself: the message escapes it, so it can still be printed
    submission[2]["id"] = "id-\ud801"
    sub.write_text("".join(json.dumps(r) + "\n" for r in submission))
    errors, _ = validate_submission(sub, good_meta)
    assert errors[0].startswith(f"{sub}:3 (id='id-\\ud801'): id: holds a lone surrogate (U+D801)")
    errors[0].encode("utf-8")  # printable
