"""A raw-socket NBD client for protocol tests (standard library only).

It sends exactly the bytes a test asks for, right or wrong: any client flags,
any option with any payload, compact (28-byte) or extended (32-byte) request
headers with any flags, lengths and payloads.  It parses what comes back
(option replies, simple replies, structured and extended chunks) without
judging it, so a test can assert on every field.  Every receive is bounded by
a timeout: a server that says nothing makes the test fail, never hang.
"""
import collections
import socket
import struct
import time

# Handshake.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REP_MAGIC = 0x0003E889045565A9
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009
REP_ERR_EXT_HEADER_REQD = 0x8000000A

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11
TF_BLOCK_STAT_PAYLOAD = 1 << 12

# Requests.
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

# Replies.
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C
REPLY_FLAG_DONE = 1

REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

STATE_HOLE = 1
STATE_ZERO = 2

# Header modes after negotiation.
SIMPLE = "simple"
STRUCTURED = "structured"
EXTENDED = "extended"

OptReply = collections.namedtuple("OptReply", "option type data")


class Closed(Exception):
    """The server closed the connection."""


class Chunk:
    """One structured or extended reply chunk (or a simple reply: simple=True).

    Fields: simple, flags, type, cookie, offset (extended chunks only, else
    None), length (payload length from the header), payload (bytes), error
    (simple replies, and error chunks), data (simple READ reply data).
    Parsed payload fields: data_offset/data (OFFSET_DATA), hole_offset and
    hole_length (OFFSET_HOLE), context_id/count/extents (block status),
    message/error_offset (error chunks).
    """

    def __init__(self, **kw):
        self.simple = False
        self.flags = 0
        self.type = None
        self.cookie = None
        self.offset = None
        self.length = 0
        self.payload = b""
        self.error = 0
        self.data = None
        self.__dict__.update(kw)

    @property
    def done(self):
        return self.simple or bool(self.flags & REPLY_FLAG_DONE)

    def __repr__(self):
        keys = ("simple", "flags", "type", "cookie", "offset", "length", "error")
        return "Chunk(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in keys)


class Reply:
    """All chunks answering one request, and what they amount to."""

    def __init__(self, cookie, chunks):
        self.cookie = cookie
        self.chunks = chunks

    @property
    def error(self):
        """The first error in the reply (0 on success)."""
        for c in self.chunks:
            if c.error:
                return c.error
        return 0

    @property
    def simple(self):
        return len(self.chunks) == 1 and self.chunks[0].simple

    def data(self, offset, length):
        """Bytes of a successful READ of [OFFSET, +LENGTH), from any reply form."""
        if self.simple:
            return self.chunks[0].data
        buf = bytearray(length)
        for c in self.chunks:
            if c.type == REPLY_TYPE_OFFSET_DATA:
                buf[c.data_offset - offset:c.data_offset - offset + len(c.data)] = c.data
        return bytes(buf)

    def status_chunks(self):
        return [c for c in self.chunks
                if c.type in (REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS_EXT)]


class RawClient:
    """One connection to an NBD server on a unix socket (or 127.0.0.1 port)."""

    def __init__(self, address, timeout=10.0):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.timeout = timeout
        self.mode = SIMPLE
        self.pending = {}              # cookie -> (type, flags, offset, length)
        self.next_cookie = 1
        self.started = False

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- bytes ----

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        """Exactly N bytes; Closed on EOF, socket.timeout when the server is silent."""
        buf = bytearray()
        while len(buf) < n:
            try:
                part = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:
                part = b""
            if not part:
                raise Closed("connection closed after %d of %d bytes" % (len(buf), n))
            buf += part
        return bytes(buf)

    def is_closed(self, timeout=5.0):
        """True if the server closes the connection within TIMEOUT seconds
        (any bytes it still sends are discarded); False if it stays open."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                try:
                    part = self.sock.recv(65536)
                except ConnectionResetError:
                    return True
                if not part:
                    return True
        except socket.timeout:
            return False
        finally:
            if self.sock:
                self.sock.settimeout(self.timeout)

    # ---- handshake ----

    def read_greeting(self):
        """(NBDMAGIC, IHAVEOPT, handshake flags) as integers."""
        magic, opts, flags = struct.unpack(">QQH", self.recv_exact(18))
        return magic, opts, flags

    def send_client_flags(self, flags):
        self.send(struct.pack(">I", flags))

    def send_option(self, option, data=b"", length=None, magic=IHAVEOPT):
        """An option header (LENGTH defaults to len(DATA)) followed by DATA."""
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, option, length) + data)

    def read_option_reply(self):
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != REP_MAGIC:
            raise AssertionError("bad option reply magic 0x%x" % magic)
        return OptReply(option, rtype, self.recv_exact(length) if length else b"")

    def read_option_replies(self):
        """Replies up to and including the final one (ACK or an error)."""
        replies = []
        while True:
            r = self.read_option_reply()
            replies.append(r)
            if r.type == REP_ACK or r.type & 0x80000000:
                return replies

    def option(self, option, data=b""):
        """Send an option and return all its replies."""
        self.send_option(option, data)
        return self.read_option_replies()

    def start(self, flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        """Read the greeting and send client FLAGS; returns the greeting flags."""
        magic, opts, gflags = self.read_greeting()
        if magic != NBDMAGIC or opts != IHAVEOPT:
            raise AssertionError("bad greeting 0x%x 0x%x" % (magic, opts))
        self.send_client_flags(flags)
        self.started = True
        return gflags

    def negotiate_mode(self, mode):
        """Ask for structured replies or extended headers (must be ACKed)."""
        if mode == STRUCTURED:
            self._expect_ack(OPT_STRUCTURED_REPLY)
        elif mode == EXTENDED:
            self._expect_ack(OPT_EXTENDED_HEADERS)

    def _expect_ack(self, option, data=b""):
        replies = self.option(option, data)
        if [r.type for r in replies] != [REP_ACK]:
            raise AssertionError("option %d: expected ACK, got %r" % (option, replies))
        return replies

    def set_meta_context(self, export, queries):
        """SET_META_CONTEXT; returns ({name: id}, final reply type)."""
        replies = self.option(OPT_SET_META_CONTEXT, meta_payload(export, queries))
        ids = {}
        for r in replies[:-1]:
            cid, = struct.unpack(">I", r.data[:4])
            ids[r.data[4:].decode()] = cid
        return ids, replies[-1].type

    def info_go(self, option, export="", infos=()):
        """INFO or GO; returns (replies, parsed {info type: payload})."""
        replies = self.option(option, info_payload(export, infos))
        infos = {}
        for r in replies:
            if r.type == REP_INFO:
                t, = struct.unpack(">H", r.data[:2])
                infos[t] = r.data[2:]
        return replies, infos

    def go(self, export="", infos=()):
        """GO that must succeed: sets self.size and self.eflags, enters transmission."""
        replies, infos = self.info_go(OPT_GO, export, infos)
        if replies[-1].type != REP_ACK:
            raise AssertionError("GO failed: %r" % (replies,))
        self.size, self.eflags = struct.unpack(">QH", infos[INFO_EXPORT])
        return self.size, self.eflags

    def connect(self, mode=STRUCTURED, export="", contexts=None):
        """Whole handshake: greeting (unless start() was called), MODE, optional SET of CONTEXTS, GO.
        Returns the context ids ({} when none were asked for)."""
        if not self.started:
            self.start()
        self.negotiate_mode(mode)
        ids = {}
        if contexts is not None:
            ids, final = self.set_meta_context(export, contexts)
            if final != REP_ACK:
                raise AssertionError("SET_META_CONTEXT failed: 0x%x" % final)
        self.go(export)
        self.mode = mode
        return ids

    # ---- transmission ----

    def request(self, type, offset=0, length=0, flags=0, payload=b"", cookie=None,
                extended=None, magic=None):
        """Send one request; returns its cookie.

        EXTENDED picks the header size (default: the negotiated mode).  LENGTH
        is sent as given; PAYLOAD follows the header as given, so a test may
        send a length that does not match its payload on purpose.
        """
        if cookie is None:
            cookie = self.next_cookie
            self.next_cookie += 1
        if extended is None:
            extended = self.mode == EXTENDED
        if extended:
            hdr = struct.pack(">IHHQQQ", magic or EXTENDED_REQUEST_MAGIC, flags, type,
                              cookie, offset, length)
        else:
            hdr = struct.pack(">IHHQQI", magic or REQUEST_MAGIC, flags, type, cookie,
                              offset, length)
        self.pending[cookie] = (type, flags, offset, length)
        self.send(hdr + payload)
        return cookie

    def read_chunk(self):
        """One simple reply or one chunk, header and payload."""
        magic, = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            c = Chunk(simple=True, error=error, cookie=cookie)
            req = self.pending.get(cookie)
            if req and req[0] == CMD_READ and error == 0:
                c.data = self.recv_exact(req[3]) if req[3] else b""
            return c
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, type, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            c = Chunk(flags=flags, type=type, cookie=cookie, length=length)
        elif magic == EXTENDED_REPLY_MAGIC:
            flags, type, cookie, offset, length = struct.unpack(">HHQQQ",
                                                                self.recv_exact(28))
            c = Chunk(flags=flags, type=type, cookie=cookie, offset=offset, length=length)
        else:
            raise AssertionError("bad reply magic 0x%08x" % magic)
        c.magic = magic
        c.payload = self.recv_exact(c.length) if c.length else b""
        parse_chunk_payload(c)
        return c

    def read_reply(self, cookie=None):
        """Chunks up to the one that ends a request (simple reply or DONE).

        With COOKIE, every chunk must belong to it (a test that pipelines
        uses read_replies instead)."""
        chunks = []
        while True:
            c = self.read_chunk()
            if cookie is not None and c.cookie != cookie:
                raise AssertionError("reply for cookie %d while waiting for %d"
                                     % (c.cookie, cookie))
            chunks.append(c)
            if c.done:
                self.pending.pop(c.cookie, None)
                return Reply(c.cookie, chunks)

    def read_replies(self, n):
        """Complete replies of N requests, in any order: {cookie: Reply}."""
        partial = {}
        done = {}
        while len(done) < n:
            c = self.read_chunk()
            if c.cookie in done:
                raise AssertionError("chunk for cookie %d after its last chunk" % c.cookie)
            partial.setdefault(c.cookie, []).append(c)
            if c.done:
                done[c.cookie] = Reply(c.cookie, partial.pop(c.cookie))
                self.pending.pop(c.cookie, None)
        return done

    def command(self, type, offset=0, length=0, flags=0, payload=b"", **kw):
        """Send a request and read its whole reply."""
        cookie = self.request(type, offset, length, flags, payload, **kw)
        return self.read_reply(cookie)

    def read(self, offset, length, flags=0):
        """READ that must succeed; returns the bytes."""
        r = self.command(CMD_READ, offset, length, flags)
        if r.error:
            raise AssertionError("READ %d+%d failed: %d" % (offset, length, r.error))
        return r.data(offset, length)

    def write(self, offset, data, flags=0):
        """WRITE with the payload flag under extended headers; returns the Reply."""
        if self.mode == EXTENDED:
            flags |= CMD_FLAG_PAYLOAD_LEN
        return self.command(CMD_WRITE, offset, len(data), flags, data)

    def disconnect(self):
        self.request(CMD_DISC)


def parse_chunk_payload(c):
    """Decode the payload of chunk C by its type (fields set on C)."""
    p = c.payload
    if c.type == REPLY_TYPE_OFFSET_DATA and len(p) >= 8:
        c.data_offset, = struct.unpack(">Q", p[:8])
        c.data = p[8:]
    elif c.type == REPLY_TYPE_OFFSET_HOLE and len(p) == 12:
        c.hole_offset, c.hole_length = struct.unpack(">QI", p)
    elif c.type == REPLY_TYPE_BLOCK_STATUS and len(p) >= 4:
        c.context_id, = struct.unpack(">I", p[:4])
        c.extents = [struct.unpack(">II", p[i:i + 8]) for i in range(4, len(p) - 7, 8)]
        c.count = len(c.extents)
    elif c.type == REPLY_TYPE_BLOCK_STATUS_EXT and len(p) >= 8:
        c.context_id, c.count = struct.unpack(">II", p[:8])
        c.extents = [struct.unpack(">QQ", p[i:i + 16]) for i in range(8, len(p) - 15, 16)]
    elif c.type in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET) and len(p) >= 6:
        c.error, mlen = struct.unpack(">IH", p[:6])
        c.message = p[6:6 + mlen].decode(errors="replace")
        if c.type == REPLY_TYPE_ERROR_OFFSET and len(p) >= 14 + mlen:
            c.error_offset, = struct.unpack(">Q", p[6 + mlen:14 + mlen])


def info_payload(export="", infos=(), name_len=None, count=None):
    """INFO/GO data; NAME_LEN and COUNT override the encoded fields."""
    name = export.encode() if isinstance(export, str) else export
    return (struct.pack(">I", len(name) if name_len is None else name_len) + name +
            struct.pack(">H", len(infos) if count is None else count) +
            b"".join(struct.pack(">H", i) for i in infos))


def meta_payload(export="", queries=(), name_len=None, count=None):
    """LIST/SET_META_CONTEXT data; NAME_LEN and COUNT override the encoded fields."""
    name = export.encode() if isinstance(export, str) else export
    out = struct.pack(">I", len(name) if name_len is None else name_len) + name
    out += struct.pack(">I", len(queries) if count is None else count)
    for q in queries:
        q = q.encode() if isinstance(q, str) else q
        out += struct.pack(">I", len(q)) + q
    return out


def status_payload(effect_length, ids):
    """A block-status payload: 8-byte effect length, then 4-byte context ids."""
    return struct.pack(">Q", effect_length) + b"".join(struct.pack(">I", i) for i in ids)
