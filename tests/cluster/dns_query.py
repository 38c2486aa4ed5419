"""Asks a DNS server for a name's A records and prints them, one a line.

tests/cluster/up.sh uses it to check cluster DNS through the kube-dns
Service address (Python's standard library, so nothing to install).
Usage: dns_query.py SERVER NAME
"""

import random
import socket
import struct
import sys


def query(server: str, name: str) -> list[str]:
    qid = random.randrange(1 << 16)
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    packet = header + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(packet, (server, 53))
        reply, _ = s.recvfrom(4096)
    rid, _flags, _qd, ancount, _ns, _ar = struct.unpack(">HHHHHH", reply[:12])
    if rid != qid:
        raise SystemExit("reply to another query")
    pos = 12 + len(question) + 4
    answers = []
    for _ in range(ancount):
        # The answer's name is a pointer (2 bytes) in CoreDNS's replies, or labels.
        if reply[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while reply[pos]:
                pos += reply[pos] + 1
            pos += 1
        rtype, _cls, _ttl, length = struct.unpack(">HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == 1 and length == 4:
            answers.append(socket.inet_ntoa(reply[pos : pos + 4]))
        pos += length
    return answers


if __name__ == "__main__":
    for address in query(sys.argv[1], sys.argv[2]):
        print(address)
