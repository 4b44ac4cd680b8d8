"""`python -m mockllm --port 8765 --script steps.json`: serve the mock LLM until interrupted, and
print the opencode config (OPENCODE_CONFIG) that points a `mock` provider at it."""

import argparse
import json
import sys

from .server import MockLLM, load_script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mockllm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--script", help="a JSON list of steps (see mockllm/server.py)")
    args = parser.parse_args(argv)
    try:
        steps = load_script(args.script) if args.script else []
    except (OSError, ValueError) as exc:
        parser.error(f"--script: {exc}")
    mock = MockLLM(steps, host=args.host, port=args.port)
    print(f"mockllm listening on {mock.base_url}", flush=True)
    print(f"OPENCODE_CONFIG='{json.dumps(mock.provider_config())}'", flush=True)
    try:
        mock.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        mock.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
