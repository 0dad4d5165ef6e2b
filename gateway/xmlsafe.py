"""Hardened XML parsing: every XML the gateway reads comes through `parse_xml`.

What an attacker controls in an XML document and what we do about it:
- DTDs and entity declarations (billion laughs, external entities such as file:///etc/passwd,
  external DTD fetches): any DOCTYPE or ENTITY declaration is refused outright
  (`xml_dtd_forbidden`) before parsing; the parser also never resolves entities, never loads a
  DTD and never touches the network, so the refusal does not depend on one check alone. The
  same words as text (a quoted HTML page in CDATA, a comment) are not a declaration.
- Size: the byte length is bounded before parsing (`xml_too_large`); libxml2's "huge tree"
  mode stays off, so single text nodes and names keep their built-in limits.
- Shape: nesting depth (`xml_too_deep`) and the number of elements (`xml_too_large`) are bounded.
- Anything else libxml2 rejects is `malformed_xml`; its own size limits (names, text nodes,
  nesting) are `xml_too_large` / `xml_too_deep`.
"""

from __future__ import annotations

import functools
import re
import threading

from lxml import etree

DEFAULT_MAX_BYTES = 1_048_576
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ELEMENTS = 50_000
# Exclusive C14N looks up each prefixed attribute among the namespaces in scope: thousands of
# both on one element cost seconds of CPU (29,000 of each in 841 KB: 4.3 s). Real documents
# carry a handful. Declarations are bounded per document (which bounds those in scope), found
# by counting "xmlns" in the text, an upper bound that costs a scan: XPath's namespace axis
# rebuilds every element's in-scope set and took 14 s on a crafted 235 KB document.
MAX_ATTRIBUTES_PER_ELEMENT = 256
MAX_NAMESPACE_DECLARATIONS = 256
SMALL_DOCUMENT = 32_768  # below this, even the worst shape canonicalises in milliseconds

# Markers of a document type declaration in the encodings a prolog can use (UTF-8 / ASCII
# supersets, UTF-16 either byte order). A plain substring search is cheap and runs in C.
_DTD_MARKERS = tuple(
    marker.encode(encoding)
    for marker in ("<!DOCTYPE", "<!ENTITY")
    for encoding in ("ascii", "utf-16-le", "utf-16-be")
)


# A document type declaration can only come in the prolog: after the XML declaration, comments,
# processing instructions and white space, before the document element. Elsewhere "<!DOCTYPE"
# is text (in CDATA, a comment, a processing instruction: an HTML page quoted in a note) or a
# well-formedness error libxml2 stops at before reading any declaration. The prolog is read at
# byte level only where that is exact: UTF-8 and single-byte ASCII supersets, in which no byte
# of a non-ASCII character looks like "-->" or "?>". In any other encoding a marker anywhere
# refuses the document.
_PROLOG_MISC = re.compile(rb"(?:<\?.*?\?>|<!--.*?-->|[ \t\r\n]+)*", re.DOTALL)
_ENCODING_DECLARATION = re.compile(
    rb"<\?xml[ \t\r\n][^>]*?encoding[ \t\r\n]*=[ \t\r\n]*[\"']([^\"']*)[\"']"
)
_BYTE_PROLOG_ENCODINGS = re.compile(
    rb"(?i)utf-?8|(us-)?ascii|iso-?8859-\d+|latin-?1|(windows-|cp)125\d"
)
_UTF8_BOM = b"\xef\xbb\xbf"


def _dtd_possible(data: bytes) -> bool:
    """Whether a marker found in `data` can be a document type declaration."""
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    head = data[start:start + 4]
    if b"\x00" in head or head[:1] not in (b"<", b" ", b"\t", b"\r", b"\n"):
        return True  # UTF-16, UTF-32, EBCDIC or not XML: judged by the marker alone
    declared = _ENCODING_DECLARATION.match(data, start)
    if declared and not _BYTE_PROLOG_ENCODINGS.fullmatch(declared[1]):
        return True
    end = _PROLOG_MISC.match(data, start).end()
    return data.startswith(b"<!", end)


class XmlError(ValueError):
    """An XML input the gateway refuses; `code` is stable, `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# lxml parsers must not be shared between threads: one per thread and option set.
_local = threading.local()


def _parser(remove_comments: bool) -> etree.XMLParser:
    parsers = getattr(_local, "parsers", None)
    if parsers is None:
        parsers = _local.parsers = {}
    parser = parsers.get(remove_comments)
    if parser is None:
        parser = etree.XMLParser(
            resolve_entities=False,
            load_dtd=False,
            dtd_validation=False,
            attribute_defaults=False,
            no_network=True,
            huge_tree=False,
            remove_blank_text=False,  # whitespace is content: signatures cover it
            remove_comments=remove_comments,
            remove_pis=False,
            strip_cdata=True,
            collect_ids=False,  # no ID table: nothing is looked up by ID
        )
        parsers[remove_comments] = parser
    return parser


def parse_xml(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    remove_comments: bool = False,
) -> etree._ElementTree:
    """Parse untrusted XML bytes into an element tree, or raise `XmlError`.

    `remove_comments=True` is for verification: comments are outside what an exclusive-C14N
    signature covers, so a verified tree must not carry them.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("parse_xml takes bytes")
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) > max_bytes:
        raise XmlError("xml_too_large", f"document is {len(data)} bytes, the limit is {max_bytes}")
    if not data or data.isspace():
        raise XmlError("malformed_xml", "empty document")
    # '!' is rare in documents and found with memchr: the marker search runs only when present.
    if b"!" in data and any(marker in data for marker in _DTD_MARKERS) and _dtd_possible(data):
        raise XmlError("xml_dtd_forbidden", "DOCTYPE and ENTITY declarations are not accepted")
    try:
        root = etree.fromstring(data, _parser(remove_comments))
    except etree.XMLSyntaxError as exc:
        raise XmlError(_syntax_error_code(exc), str(exc)) from None
    tree = root.getroottree()
    # Second line of defence: the byte scan can miss an exotic encoding, the parser cannot.
    docinfo = tree.docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise XmlError("xml_dtd_forbidden", "DOCTYPE and ENTITY declarations are not accepted")
    _check_shape(root, data, max_depth, max_elements)
    return tree


def _syntax_error_code(exc: etree.XMLSyntaxError) -> str:
    """The code of a libxml2 refusal: its own limits (nesting 256 deep, names of 50,000
    characters, text and attribute values of 10 MB, which a raised `max_bytes` lets through)
    are size refusals, not malformed XML. Decided by libxml2's error number, never by the
    message alone: the message quotes names from the document (`<depth></a>` is malformed)."""
    message = str(exc)
    if exc.code == _ERR_RESOURCE_LIMIT and "depth" in message.lower():
        return "xml_too_deep"
    if exc.code in (_ERR_RESOURCE_LIMIT, _ERR_NAME_TOO_LONG):
        return "xml_too_large"
    # Comments, processing instructions and CDATA over the limit end like unfinished ones.
    if exc.code in _ERR_NOT_FINISHED and " too big found" in message:
        return "xml_too_large"
    return "malformed_xml"


_ERR_RESOURCE_LIMIT = etree.ErrorTypes.ERR_RESOURCE_LIMIT
_ERR_NAME_TOO_LONG = etree.ErrorTypes.ERR_NAME_TOO_LONG
_ERR_NOT_FINISHED = frozenset({
    etree.ErrorTypes.ERR_COMMENT_NOT_FINISHED, etree.ErrorTypes.ERR_PI_NOT_FINISHED,
    etree.ErrorTypes.ERR_CDATA_NOT_FINISHED,
})


def _check_shape(root: etree._Element, data: bytes, max_depth: int, max_elements: int) -> None:
    # Cheap bounds first, so the tree is walked only when the input could break a limit: an
    # element takes at least 4 bytes ("<a/>") and one '<'; each level of nesting at least 7
    # bytes ("<a></a>"). The '<' is the byte 0x3C only in the usual encodings: UTF-7 writes it
    # "+ADw-", and such a document is counted element by element.
    if len(data) > 4 * max_elements and (
        not _LT_IS_BYTE_3C.fullmatch(root.getroottree().docinfo.encoding or "utf-8")
        or data.count(b"<") > max_elements
    ):
        count = int(root.xpath("count(//*)"))
        if count > max_elements:
            raise XmlError("xml_too_large", f"document has {count} elements, the limit is {max_elements}")
    # An element at depth max_depth + 1 exists iff this location path selects something.
    if len(data) > 7 * max_depth and _too_deep(max_depth)(root):
        raise XmlError("xml_too_deep", f"elements nest deeper than {max_depth}")
    if len(data) > SMALL_DOCUMENT:
        declarations = _text_of(data, root).count("xmlns")
        if declarations > MAX_NAMESPACE_DECLARATIONS:
            raise XmlError("xml_too_large", f"document declares up to {declarations} namespaces, "
                           f"the limit is {MAX_NAMESPACE_DECLARATIONS}")
        if _too_many_attributes(root):
            raise XmlError("xml_too_large",
                           f"an element has more than {MAX_ATTRIBUTES_PER_ELEMENT} attributes")


# Encodings in which every '<' of the markup is a 0x3C byte (UTF-16 and UTF-32 included).
_LT_IS_BYTE_3C = re.compile(
    r"(?i)utf-?8|(us-)?ascii|iso-?8859-\d+|latin-?1|utf-?(16|32)(le|be)?|ucs-?[24]|(windows-|cp)125\d"
)
_too_many_attributes = etree.XPath(f"boolean(//*[count(@*) > {MAX_ATTRIBUTES_PER_ELEMENT}])")


def _text_of(data: bytes, root: etree._Element) -> str:
    """The document as text in its own encoding (UTF-16 and UTF-32 hide "xmlns" from a byte scan)."""
    encoding = root.getroottree().docinfo.encoding or "utf-8"
    try:
        return data.decode(encoding, errors="replace")
    except LookupError:  # an encoding libxml2 knows and Python does not
        return data.decode("latin-1")


@functools.lru_cache(maxsize=16)
def _too_deep(max_depth: int) -> etree.XPath:
    return etree.XPath("boolean(/*" + "/*" * max_depth + ")")
