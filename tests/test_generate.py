"""`posttrain generate`: one-shot prompts, sampling options, --chat, the stdin chat loop, one-line errors."""

import io

import pytest

from posttrain import cli, generate
from posttrain.models import loading


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "run"
    model = loading.load_pretrained_model("posttrain/tiny")
    tokenizer = loading.load_tokenizer("posttrain/tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli.main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prompt_greedy_is_deterministic(model_dir, capsys):
    code, out1, _ = _run(["--model", model_dir, "--prompt", "Question: 2 + 3?\nAnswer:", "--max_new_tokens", "6"],
                         capsys)
    code2, out2, _ = _run(["--model", model_dir, "--prompt", "Question: 2 + 3?\nAnswer:", "--max_new_tokens", "6"],
                          capsys)
    assert code == code2 == 0 and out1 == out2 and len(out1.strip().splitlines()) == 1


def test_sampling_several_sequences_with_chat_template(model_dir, capsys):
    code, out, _ = _run(["--model", model_dir, "--prompt", "hi", "--chat", "--temperature", "1.0", "--top_p", "0.9",
                         "--num_return_sequences", "3", "--max_new_tokens", "4"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and [line[:4] for line in lines] == ["[1] ", "[2] ", "[3] "]


def test_chat_loop_keeps_history_and_exits(model_dir, monkeypatch, capsys):
    seen = []
    real = generate.complete

    def spy(model, tokenizer, prompt, **kw):
        seen.append(prompt)
        return real(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(generate, "complete", spy)
    code, out, _ = _run(["--model", model_dir, "--max_new_tokens", "3"], capsys,
                        stdin="hello\n\nagain\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0 and len(out.strip().splitlines()) == 2
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"] and seen[1][2]["content"] == "again"
    assert all(m["content"] != "never read" for p in seen for m in p)


def test_chat_loop_ends_at_eof_and_resets(model_dir, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(generate, "complete", lambda m, t, prompt, **kw: seen.append(prompt) or ["ok"])
    code, out, _ = _run(["--model", model_dir], capsys, stdin="a\n/reset\nb", monkeypatch=monkeypatch)
    assert code == 0 and out == "ok\nok\n" and seen[1] == [{"role": "user", "content": "b"}]


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["--prompt", "x"], "required: --model"),
    (["--model", "MODEL/config.json", "--prompt", "x"], "is a file"),
    (["--model", "MODEL", "--prompt", "x", "--num_return_sequences", "2"], "needs --temperature > 0"),
    (["--model", "MODEL", "--prompt", "x", "--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--model", "MODEL", "--prompt", "x", "--max_new_tokens", "zero"], "invalid int value"),
    (["--model", "MODEL", "--prompt", "x", "--temprature", "1"], "unrecognized arguments"),
])
def test_one_line_errors(model_dir, capsys, argv, message):
    argv = [a.replace("MODEL", model_dir) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("posttrain generate: error:")]
    assert len(lines) == 1 and message in lines[0], err
