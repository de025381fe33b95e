/*
 * REPORT: one self-contained HTML page a lab lead reads after a run (summaries, plots, tissue
 * QC pictures, classifier metrics, per-stage timings and package versions). Each staged
 * result folder is named on the command line: the folders are links, which a search from a
 * common parent would not enter.
 */
process REPORT {
    tag "run report"
    label 'process_single'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path results, arity: '1..*', stageAs: 'results/*'

    output:
    path 'report.html', emit: report
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress report ${results} ${args} --out report.html

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    touch report.html

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
