"""The one human-readable formatter: the exact strings the CLI has always printed."""

from llmcli.units import format_bytes, format_count


def test_decimal_bytes():
    # `llm pull` / `llm list` / `llm quantize` sizes
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(999) == "999 B"
    assert format_bytes(1000) == "1.0 KB"
    assert format_bytes(287_600) == "287.6 KB"
    assert format_bytes(98_400_000) == "98.4 MB"
    assert format_bytes(999_950) == "1000.0 KB"  # unit chosen before rounding, as before
    assert format_bytes(269_060_096) == "269.1 MB"
    assert format_bytes(16_060_522_496) == "16.1 GB"
    assert format_bytes(1.5e12) == "1.5 TB"
    assert format_bytes(2.5e15) == "2500.0 TB"
    assert format_bytes(512.4) == "512 B"  # transfer rates are floats


def test_binary_bytes():
    # `llm estimate`
    assert format_bytes(0, binary=True) == "0 B"
    assert format_bytes(1023, binary=True) == "1023 B"
    assert format_bytes(1024, binary=True) == "1.00 KiB"
    assert format_bytes(269_036_544, binary=True) == "256.57 MiB"
    assert format_bytes(9216, binary=True) == "9.00 KiB"
    assert format_bytes(16 << 30, binary=True) == "16.00 GiB"
    assert format_bytes(3 << 40, binary=True) == "3.00 TiB"
    assert format_bytes(1023.9, binary=True) == "1023 B"


def test_counts():
    # `llm list` / `llm show` parameters, the chat banner
    assert format_count(576) == "576"
    assert format_count(1000) == "1.0K"
    assert format_count(134_515_008) == "134.5M"
    assert format_count(88_142_208) == "88.1M"
    assert format_count(8_030_261_248) == "8.0B"
    assert format_count(671_026_419_712) == "671.0B"
    assert format_count(1_026_000_000_000) == "1.0T"


def test_significant_counts():
    # `llm estimate --explain`, `llm run --verbose`
    assert format_count(576, significant=True) == "576"
    assert format_count(8_030_261_248, significant=True) == "8.03B"
    assert format_count(134_515_008, significant=True) == "134.5M"
    assert format_count(28_311_552, significant=True) == "28.3M"
    assert format_count(1000, significant=True) == "1K"
    assert format_count(1_500, significant=True) == "1.5K"
    assert format_count(99_950_000, significant=True) == "100M"  # .3g rounds up at the boundary, as before
    assert format_count(2.5e12, significant=True) == "2.5T"
