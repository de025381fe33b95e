/*
 * CLASSIFY: classifier probabilities and labels added as columns to the gathered tables and
 * the summary rewritten with accepted-cell counts; no slide is read, no GPU used.
 */
process CLASSIFY {
    tag "apply classifiers"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path cells
    path classifiers, stageAs: 'classifiers'

    output:
    path 'classified', emit: classified
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg classify ${cells} --classifiers ${classifiers} ${args} --out classified

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p classified
    touch classified/summary.csv

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
