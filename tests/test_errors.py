from vitcc.errors import VitccError, first_line, internal_error_line


def test_first_line_is_the_message_s_first_non_empty_line_or_the_type():
    assert first_line(ValueError("\n  shapes differ: 3 vs 4\n  at node add_1\n")) == "shapes differ: 3 vs 4"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(VitccError("   ")) == "VitccError"


def test_internal_error_line_names_the_type_the_place_and_where_to_report():
    try:
        raise RuntimeError("boom\nmore")
    except RuntimeError as e:
        line = internal_error_line(e)
    assert line.startswith("internal error in vitcc (RuntimeError at tests/test_errors.py:")
    assert "): boom; please report it" in line and "\n" not in line
