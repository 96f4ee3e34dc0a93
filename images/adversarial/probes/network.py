"""Which interfaces and routes exist, and can we reach the host or craft raw packets?"""

import socket
import sys

from report import attempt, write

gateway = sys.argv[1] if len(sys.argv) > 1 else None
port = int(sys.argv[2]) if len(sys.argv) > 2 else 2375
with open("/proc/net/dev") as handle:
    interfaces = sorted(line.split(":")[0].strip() for line in handle.readlines()[2:])
with open("/proc/net/route") as handle:
    routes = [line.split() for line in handle.readlines()[1:] if line.strip()]


def connect():
    with socket.create_connection((gateway, port), timeout=3):
        pass


def raw_socket():
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()


def packet_socket():
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()


write("network.json", {
    "interfaces": interfaces,
    "routes": routes,
    "connect_gateway": attempt(connect) if gateway else "skipped",
    "raw_socket": attempt(raw_socket),
    "packet_socket": attempt(packet_socket),
})
