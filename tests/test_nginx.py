"""Two servers behind nginx with the shipped deploy/nginx.conf (ports changed, paths in a
temporary folder): new conversations spread over both, and every `previous_response_id`
reaches the server that holds its state (a misrouted one would be a 404), through the
official client. nginx comes from Debian's packages (the test command installs it)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import rwkv_gpu
from conftest import DATA, open_model
from rwkv_gpu.server import nginx_route, response_id
from test_server import serving

CONFIG = Path(__file__).parent.parent / "deploy" / "nginx.conf"
NAME = "trained-bytes"
KEY = "sk-test-key"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_response_ids_route_back_to_their_server():
    for servers in (1, 2, 3, 5):
        for index in range(servers):
            for _ in range(20):
                rid = response_id((index, servers))
                assert re.fullmatch(r"resp_[0-9a-f]{32}", rid) and nginx_route(rid, servers) == index
    # The hash nginx documents (Cache::Memcached's): a known value pins the formula.
    assert nginx_route("resp_0", 1 << 15) == (__import__("zlib").crc32(b"resp_0") >> 16) & 0x7FFF


def test_two_servers_behind_nginx(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.fail("nginx is not installed: `bash scripts/install.sh test` installs it (apt: nginx-light)")
    model = open_model(DATA / "trained-bytes" / "model.safetensors")
    with serving(model, route=(0, 2)) as first, serving(model, route=(1, 2)) as second:
        front = free_port()
        config = CONFIG.read_text()
        config = config.replace("127.0.0.1:8000", f"127.0.0.1:{front}")
        config = config.replace("127.0.0.1:8001", first.removeprefix("http://"))
        config = config.replace("127.0.0.1:8002", second.removeprefix("http://"))
        temp = "".join(f"    {kind}_temp_path {tmp_path / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = config.replace("http {\n", "http {\n" + temp + f"    access_log {tmp_path / 'access.log'};\n", 1)
        (tmp_path / "nginx.conf").write_text(config)
        proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
                                 "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{front}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{front}/v1", api_key=KEY, max_retries=0, timeout=120)
            chat = rwkv_gpu.Chat(model, max_tokens=6, temperature=0.0)
            want = [chat.ask("Say one."), chat.ask("Say two."), chat.ask("Say three.")]
            routes = set()
            for _ in range(6):  # six conversations of three turns
                previous, texts = None, []
                for message in ("Say one.", "Say two.", "Say three."):
                    r = client.responses.create(model=NAME, input=message, previous_response_id=previous,
                                                max_output_tokens=6, temperature=0.0)
                    previous = r.id
                    texts.append(r.output_text)
                    routes.add(nginx_route(r.id, 2))
                assert texts == want
            # New conversations go where nginx hashes a random request id: six land on one
            # server 1 time in 32, so more first turns (one token each) are sent until
            # both have answered; 40 all on one server would be 1 in 2^39.
            for _ in range(40):
                if routes == {0, 1}:
                    break
                r = client.responses.create(model=NAME, input="Say one.", max_output_tokens=1, temperature=0.0)
                routes.add(nginx_route(r.id, 2))
            assert routes == {0, 1}, "the conversations should have spread over both servers"
            # Sent to the other server directly, a continuation is unknown there.
            other = second if nginx_route(previous, 2) == 0 else first
            direct = openai.OpenAI(base_url=f"{other}/v1", api_key=KEY, max_retries=0)
            with pytest.raises(openai.NotFoundError):
                direct.responses.create(model=NAME, input="x", previous_response_id=previous, max_output_tokens=2)
            # A stream through nginx arrives piece by piece and complete.
            pieces = list(client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say one."}],
                                                         max_tokens=6, temperature=0.0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == want[0]
        finally:
            proc.terminate()
            proc.wait(timeout=20)
