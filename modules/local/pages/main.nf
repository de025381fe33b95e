/*
 * PAGES: the static annotation site (index + paged galleries per cell type) that people open
 * in a browser to mark cells Yes / No / Unsure. The ranking (optional: an empty list) is
 * CLASSIFY's uncertainty order for --order uncertainty.
 */
process PAGES {
    tag "annotation site"
    label 'process_low'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path cells
    path ranking

    output:
    path 'site', emit: site
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress pages ${cells} --ranking ${ranking} ${args} --out site

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p site
    touch site/index.html

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
