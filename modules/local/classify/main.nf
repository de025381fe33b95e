/*
 * CLASSIFY: classifier probabilities and labels added as columns to the gathered tables and
 * the summary rewritten with accepted-cell counts; no slide is read, no GPU used. Labels
 * (optional: an empty list) are left out of the uncertainty ranking.
 */
process CLASSIFY {
    tag "apply classifiers"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path cells
    path classifiers, stageAs: 'classifiers'
    path labels, stageAs: 'labels??/*'

    output:
    path 'classified', emit: classified
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress classify ${cells} --classifiers ${classifiers} --labels ${labels} ${args} --out classified

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p classified
    touch classified/summary.csv classified/ranking.parquet

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
