"""What eval.py measures with and draws: early commitment (commitment.py), the evidence boxes of the
occlusion test (boxes.py), each reply token's attention (explorer.py, explorer.html), the pictures
(draw.py), and the report itself (report.py: the table, report.json, report.md, report.html)."""
