"""Hostile XML is refused with a specific code before it can do harm."""

from __future__ import annotations

import threading

import pytest
from lxml import etree

from gateway.xmlsafe import XmlError, parse_xml
from tests.loopback import serving

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE order [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<order>&xxe;</order>"""


def code_of(data: bytes, **limits) -> str:
    with pytest.raises(XmlError) as caught:
        parse_xml(data, **limits)
    return caught.value.code


def test_plain_document_parses_with_whitespace_and_comments_kept():
    tree = parse_xml(b'<?xml version="1.0"?>\n<a xmlns="urn:x">\n  <!-- note --><b k="v">t</b>\n</a>')
    root = tree.getroot()
    assert root.tag == "{urn:x}a"
    assert root.text == "\n  "
    assert isinstance(root[0], etree._Comment)
    assert root[1].get("k") == "v"


def test_comments_removed_on_request():
    tree = parse_xml(b"<a>x<!-- c -->y</a>", remove_comments=True)
    assert etree.tostring(tree) == b"<a>xy</a>"


def test_billion_laughs_is_refused():
    assert code_of(BILLION_LAUGHS) == "xml_dtd_forbidden"


def test_external_entity_is_refused_and_never_read():
    assert code_of(XXE) == "xml_dtd_forbidden"


def test_utf16_doctype_is_refused():
    doc = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>'.encode("utf-16")
    assert code_of(doc) == "xml_dtd_forbidden"


@pytest.fixture()
def dtd_server():
    """A loopback HTTP server that records whether anybody fetched the external DTD."""
    with serving(lambda: b'<!ENTITY ext "fetched">') as (base, hits):
        yield f"{base}/evil.dtd", hits


def test_external_dtd_is_refused_without_network(dtd_server):
    url, hits = dtd_server
    doc = f'<?xml version="1.0"?><!DOCTYPE a SYSTEM "{url}"><a>&ext;</a>'.encode()
    assert code_of(doc) == "xml_dtd_forbidden"
    doc = f'<?xml version="1.0"?><!DOCTYPE a PUBLIC "-//X//Y" "{url}"><a/>'.encode()
    assert code_of(doc) == "xml_dtd_forbidden"
    assert hits == []


def test_deep_nesting_is_refused():
    assert code_of(b"<a>" * 65 + b"</a>" * 65) == "xml_too_deep"
    parse_xml(b"<a>" * 64 + b"</a>" * 64)  # the limit itself is fine
    assert code_of(b"<a>" * 10 + b"</a>" * 10, max_depth=5) == "xml_too_deep"


def test_nesting_beyond_the_parser_limit_is_too_deep():
    # libxml2 stops at 256 levels on its own; the code is the same.
    assert code_of(b"<a>" * 5000 + b"</a>" * 5000) == "xml_too_deep"


def test_oversize_is_refused_before_parsing():
    assert code_of(b"<a>" + b"x" * 2000 + b"</a>", max_bytes=1000) == "xml_too_large"


def test_too_many_elements_is_refused():
    doc = b"<a>" + b"<b/>" * 501 + b"</a>"
    assert code_of(doc, max_elements=500) == "xml_too_large"
    parse_xml(doc, max_elements=502)


@pytest.mark.parametrize("data", [b"", b"   ", b"<a>", b"<a></b>", b"not xml", b"<a>&undefined;</a>",
                                  b"<a/><b/>", b"\xff\xfe\x00<"])
def test_malformed(data):
    assert code_of(data) == "malformed_xml"


def test_error_carries_code_and_message():
    with pytest.raises(XmlError) as caught:
        parse_xml(XXE)
    assert caught.value.code == "xml_dtd_forbidden"
    assert "DOCTYPE" in caught.value.message
    assert str(caught.value).startswith("xml_dtd_forbidden")


def test_parsing_is_thread_safe():
    docs = [f"<r><i n='{i}'>{i}</i></r>".encode() for i in range(200)]
    errors: list[Exception] = []

    def work():
        try:
            for i, doc in enumerate(docs):
                assert parse_xml(doc).getroot()[0].get("n") == str(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_thousands_of_namespaces_and_attributes_on_one_element_are_refused():
    """Exclusive C14N looks up each prefixed attribute among the namespaces in scope: 29,000 of
    each (841 KB) took 4.3 s of CPU to canonicalise before this limit."""
    n = 29_000
    declarations = " ".join(f'xmlns:p{i}="u:{i}"' for i in range(n))
    attributes = " ".join(f'p{i}:x=""' for i in range(n))
    with pytest.raises(XmlError) as caught:
        parse_xml(f"<r {declarations}><a {attributes}/></r>".encode())
    assert caught.value.code == "xml_too_large"
    assert "declares up to" in caught.value.message


def test_namespaces_declared_again_on_every_level_are_refused():
    """63 nested elements each declaring the same 63 prefixes: the namespace axis of an XPath
    check took 14 s on this 235 KB document; the declarations are counted instead."""
    declarations = " ".join(f'xmlns:p{i}="urn:{i}"' for i in range(63))
    document = ("".join(f"<e{d} {declarations}>" for d in range(63)) + "<a/>" * 40_000
                + "".join(f"</e{d}>" for d in reversed(range(63)))).encode()
    with pytest.raises(XmlError) as caught:
        parse_xml(document)
    assert caught.value.code == "xml_too_large"


def test_an_element_with_too_many_attributes_is_refused():
    attributes = " ".join(f'a{i}="x"' for i in range(300))
    with pytest.raises(XmlError) as caught:
        parse_xml(f"<r><e {attributes}/>{'<a/>' * 8000}</r>".encode())
    assert "more than 256 attributes" in caught.value.message


def test_a_large_document_of_ordinary_width_is_accepted():
    body = "".join(f'<a:item n="{i}" m="x"><b:v>{i}</b:v></a:item>' for i in range(20_000))
    tree = parse_xml(f'<r xmlns="u:r" xmlns:a="u:a" xmlns:b="u:b">{body}</r>'.encode())
    assert len(tree.getroot()) == 20_000
