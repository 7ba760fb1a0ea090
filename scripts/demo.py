"""`make run`: an API server and a worker from config.yaml, and one task through them end to end.

Schedules `count_words` over REST, prints its final state and the dashboard's URL, then
keeps both processes serving until Ctrl-C.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
G = str(Path(sys.executable).parent / "g")
API = "http://127.0.0.1:8080"
AUTH = "Basic " + base64.b64encode(b"root:root").decode()


def call(method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(API + path, data=data, method=method)
    request.add_header("Authorization", AUTH)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def ensure_database() -> None:
    import psycopg2

    conn = psycopg2.connect(dbname="postgres", user="postgres", host="127.0.0.1", port=5432)
    conn.autocommit = True
    cursor = conn.cursor()
    cursor.execute("SELECT 1 FROM pg_database WHERE datname = 'guillotina'")
    if cursor.fetchone() is None:
        cursor.execute("CREATE DATABASE guillotina")
    conn.close()


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT}"}
    return subprocess.Popen([G, *args, "-c", str(ROOT / "config.yaml")], cwd=ROOT, env=env)


def wait_for_api(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if call("GET", "/")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit("the API server did not answer on " + API)


def run_one_task() -> None:
    status, _ = call("POST", "/db", {"@type": "Container", "id": "demo"})
    if status not in (200, 409):
        sys.exit(f"could not create the demo container: HTTP {status}")
    status, body = call("POST", "/db/demo/@demo-count", {"text": "tasks travel through rabbitmq"})
    print(f"\n>>> scheduled task: HTTP {status} {body}", flush=True)
    task_id = body["task_id"]  # type: ignore[index]
    for _ in range(600):
        status, state = call("GET", f"/db/demo/@amqp-tasks/{task_id}")
        if isinstance(state, dict) and state.get("status") in ("finished", "errored", "canceled"):
            break
        time.sleep(0.1)
    print(">>> final state of the task:", json.dumps(state, indent=2), sep="\n", flush=True)
    print(">>> API on http://127.0.0.1:8080 (root/root), worker running. Ctrl-C to stop.", flush=True)
    print(f">>> Dashboard: {API}/db/demo/@amqp-dashboard (log in as root/root)\n", flush=True)


def main() -> None:
    ensure_database()
    processes = [start("serve")]
    try:
        # the worker once the API answers: on a fresh database both would create its tables at once
        wait_for_api()
        processes.append(start("amqp-worker"))
        run_one_task()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while all(process.poll() is None for process in processes):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
