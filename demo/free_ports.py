"""Print the first of N consecutive free ports on 127.0.0.1 (demo stages give Triton HTTP, gRPC and
metrics consecutive ports: `zooter bench --triton` finds gRPC at HTTP + 1 and metrics at HTTP + 2)."""

import socket
import sys

count, start = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 18000
for base in range(start, 30000, count):
    try:
        socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(count)]
    except OSError:
        continue
    for s in socks:
        s.close()
    print(base)
    break
else:
    sys.exit(f"no {count} consecutive free ports between {start} and 30000")
