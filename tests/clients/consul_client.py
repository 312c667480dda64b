"""Drives the sidecar's Consul KV API with the py-consul client, as an app would.

    python consul_client.py PORT read KEY PREFIX     -> get, missing key, recurse, keys (and with /)
    python consul_client.py PORT block KEY INDEX     -> a blocking get from INDEX (wait 20s)
    python consul_client.py PORT write PREFIX        -> put, create-only put, cas put, delete

Values are printed as text; a Consul exception as {"error": class name, ...}.
"""
import json
import sys

import consul


def text(b):
    return b.decode() if isinstance(b, bytes) else b


def main():
    port, phase = int(sys.argv[1]), sys.argv[2]
    kv = consul.Consul(host="127.0.0.1", port=port).kv
    try:
        if phase == "read":
            key, prefix = sys.argv[3], sys.argv[4]
            index, item = kv.get(key)
            _, missing = kv.get(prefix + "no-such-key")
            _, items = kv.get(prefix, recurse=True)
            _, keys = kv.get(prefix, keys=True)
            _, dirs = kv.get(prefix, keys=True, separator="/")
            print(json.dumps({
                "index": int(index), "get": text(item["Value"]), "modify_index": item["ModifyIndex"],
                "missing": missing, "recurse": [[i["Key"], text(i["Value"])] for i in items],
                "keys": keys, "dirs": dirs,
            }))
        elif phase == "block":
            key, since = sys.argv[3], sys.argv[4]
            index, item = kv.get(key, index=since, wait="20s")
            print(json.dumps({"index": int(index), "value": text(item["Value"]) if item else None}))
        elif phase == "write":
            prefix = sys.argv[3]
            out = {"put": kv.put(prefix + "w", "one")}
            out["create_existing"] = kv.put(prefix + "w", "two", cas=0)
            _, item = kv.get(prefix + "w")
            out["cas_stale"] = kv.put(prefix + "w", "three", cas=item["ModifyIndex"] - 1)
            out["cas"] = kv.put(prefix + "w", "four", cas=item["ModifyIndex"])
            out["after"] = text(kv.get(prefix + "w")[1]["Value"])
            out["delete"] = kv.delete(prefix + "w")
            out["gone"] = kv.get(prefix + "w")[1]
            print(json.dumps(out))
        else:
            raise SystemExit("unknown phase " + phase)
    except consul.ConsulException as e:
        print(json.dumps({"error": type(e).__name__, "detail": str(e)}))


if __name__ == "__main__":
    main()
