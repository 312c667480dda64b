"""Drives the sidecar's etcd v3 gateway with the etcd3gw client, as an app would.

    python etcd3gw_client.py PORT read KEY PREFIX   -> {"get": [...], "prefix": [[key, value], ...]}
    python etcd3gw_client.py PORT write PREFIX      -> results of put, create (twice), replace, delete
    python etcd3gw_client.py PORT watch PREFIX N    -> prints "ready", then N events as JSON lines

Values and keys are printed as text; an exception is printed as {"error": class name, ...}.
"""
import json
import sys

import etcd3gw


def text(b):
    return b.decode() if isinstance(b, bytes) else b


def main():
    port, phase = int(sys.argv[1]), sys.argv[2]
    client = etcd3gw.client(host="127.0.0.1", port=port, timeout=10)
    try:
        if phase == "read":
            key, prefix = sys.argv[3], sys.argv[4]
            got = [text(v) for v in client.get(key)]
            listed = [[text(meta["key"]), text(v)] for v, meta in client.get_prefix(prefix)]
            print(json.dumps({"get": got, "prefix": listed}))
        elif phase == "write":
            prefix = sys.argv[3]
            out = {"put": client.put(prefix + "written", "by etcd3gw")}
            out["create"] = [client.create(prefix + "once", "1"), client.create(prefix + "once", "2")]
            out["replace"] = client.replace(prefix + "once", "1", "3")
            out["after"] = [text(v) for v in client.get(prefix + "once")]
            out["delete"] = client.delete(prefix + "written")
            print(json.dumps(out))
        elif phase == "watch":
            prefix, wanted = sys.argv[3], int(sys.argv[4])
            events, cancel = client.watch_prefix(prefix)
            print("ready", flush=True)
            for n, event in enumerate(events, 1):
                kv = event["kv"]
                print(json.dumps({"type": event.get("type", "PUT"), "key": text(kv["key"]),
                                  "value": text(kv.get("value", b"")),
                                  "mod_revision": int(kv["mod_revision"])}), flush=True)
                if n == wanted:
                    break
            cancel()
        else:
            raise SystemExit("unknown phase " + phase)
    except etcd3gw.exceptions.Etcd3Exception as e:
        print(json.dumps({"error": type(e).__name__, "detail": str(e)}))


if __name__ == "__main__":
    main()
